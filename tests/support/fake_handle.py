"""A fake guest for unit tests of the target side: a VMHandle (and a PostCopyHandle) that
counts what is done to it. ``hold`` makes resume() wait until it is set, so that a test
can run several paths into the same resume."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import numpy.typing as npt

from handler.drivers.base import GuestSpec, GuestStatus, PageIndices


class FakeHandle:
    def __init__(self, vm_id: str = "uid-1.in-mig00000", *, memory_bytes: int = 1 << 20) -> None:
        self.vm_id = vm_id
        self.spec = GuestSpec(memory_bytes=memory_bytes)
        self.pid = 4242
        self.ram_path = Path("/nonexistent") / f"{vm_id}.ram"
        self.incoming = True
        self.resumed_with: list[bytes | None] = []
        self.postcopy_resumed_with: list[bytes] = []
        self.destroyed = 0
        self.hold: asyncio.Event | None = None
        self._ram = bytearray(memory_bytes)

    @property
    def driver_name(self) -> str:
        return "fake"

    @property
    def page_count(self) -> int:
        return self.spec.page_count

    def ram(self) -> memoryview:
        return memoryview(self._ram)

    async def pause(self) -> None:
        return None

    async def resume(self, device_state: bytes | None = None) -> None:
        self.resumed_with.append(device_state)
        if self.hold is not None:
            await self.hold.wait()
        self.incoming = False

    async def set_throttle(self, percent: int) -> None:
        return None

    async def status(self) -> GuestStatus:
        return GuestStatus(
            state="incoming" if self.incoming else "running",
            ticks=1,
            last_tick_ns=0,
            throttle_percent=0,
            resume_gap_ms=1.5,
            pid=self.pid,
        )

    def is_alive(self) -> bool:
        return self.destroyed == 0

    async def stop(self) -> None:
        return None

    async def destroy(self) -> None:
        self.destroyed += 1

    def close(self) -> None:
        return None

    # -- post-copy ------------------------------------------------------------------------

    def prepare_postcopy(self, missing: PageIndices) -> None:
        return None

    def present(self) -> npt.NDArray[np.uint8]:
        return np.ones(self.page_count, dtype=np.uint8)

    def mark_present(self, indices: PageIndices) -> None:
        return None

    def requested_pages(self) -> PageIndices:
        return np.empty(0, dtype=np.int64)

    def missing_pages(self) -> PageIndices:
        return np.empty(0, dtype=np.int64)

    async def resume_postcopy(self, device_state: bytes) -> None:
        self.postcopy_resumed_with.append(device_state)
        self.incoming = False

    async def finish_postcopy(self) -> GuestStatus:
        return await self.status()

    @property
    def resumes(self) -> int:
        return len(self.resumed_with) + len(self.postcopy_resumed_with)
