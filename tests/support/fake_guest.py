"""A guest for unit tests of the migration engines: RAM in a small file in a temporary
directory (mapped, as a driver maps it), a dirty log the test scripts, and a record of
every request the engine made.

``hot`` pages are the workload: every harvest while the guest runs finds them written
again (new bytes, marked dirty), as a guest that keeps writing its hot set would. Hooks
(``on_pause``, ``on_harvest``) let a test act at an exact step of the migration; a hook
that raises makes the request fail.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from handler.drivers.base import GuestError, GuestSpec, GuestStatus, PageIndices, PageMask

MiB = 1 << 20


class FakeGuest:
    """A VMHandle (handler/drivers/base.py) with no process behind it."""

    def __init__(
        self,
        directory: Path,
        vm_id: str = "fake",
        memory_bytes: int = MiB,
        *,
        page_size: int = 4096,
        incoming: bool = False,
        seed: int = 7,
    ) -> None:
        self.vm_id = vm_id
        self.spec = GuestSpec(memory_bytes=memory_bytes, page_size=page_size)
        self.pid = os.getpid()
        self.ram_path = directory / f"{vm_id}.ram"
        with open(self.ram_path, "wb") as f:
            f.truncate(memory_bytes)
        fd = os.open(self.ram_path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, memory_bytes)
        finally:
            os.close(fd)
        self.pages: npt.NDArray[np.uint8] = np.frombuffer(self._mm, dtype=np.uint8).reshape(
            -1, page_size
        )
        self._rng = np.random.default_rng(seed)
        self.dirty = np.zeros(self.spec.page_count, dtype=np.bool_)
        self.state = "incoming" if incoming else "running"
        if not incoming:
            self.pages[:] = self._rng.integers(0, 256, self.pages.shape, dtype=np.uint8)
        self.hot: PageIndices = np.empty(0, dtype=np.int64)
        self.calls: list[str] = []
        self.throttles: list[int] = []
        self.on_pause: Callable[[], Awaitable[None]] | None = None
        self.on_harvest: Callable[[], None] | None = None
        self.fail_destroy: GuestError | None = None
        self.destroyed = False
        self.harvests = 0

    @property
    def driver_name(self) -> str:
        return "fake"

    @property
    def incoming(self) -> bool:
        return self.state == "incoming"

    @property
    def page_count(self) -> int:
        return self.spec.page_count

    # -- memory --

    def ram(self) -> memoryview:
        return memoryview(self._mm)

    def write(self, indices: PageIndices) -> None:
        """The guest writes these pages (new bytes) and its dirty log records them."""
        if indices.size:
            self.pages[indices] = self._rng.integers(
                0, 256, (len(indices), self.spec.page_size), dtype=np.uint8
            )
            self.dirty[indices] = True

    def harvest_dirty(self) -> PageIndices:
        self.harvests += 1
        if self.state == "running":  # it wrote its hot set since the last harvest
            self.write(self.hot)
        indices = np.flatnonzero(self.dirty).astype(np.int64)
        self.dirty[indices] = False
        if self.on_harvest is not None:
            self.on_harvest()
        return indices

    def mark_all_dirty(self) -> None:
        self.dirty[:] = True

    def clear_dirty(self) -> None:
        self.dirty[:] = False

    def data_pages(self) -> PageMask | None:
        return None

    # -- control --

    async def pause(self) -> None:
        self.calls.append("pause")
        if self.on_pause is not None:
            await self.on_pause()
        self.state = "paused"

    async def resume(self, device_state: bytes | None = None) -> None:
        self.calls.append("resume")
        self.state = "running"

    async def set_throttle(self, percent: int) -> None:
        self.throttles.append(percent)

    async def device_state(self) -> bytes:
        return b'{"fake": true}'

    async def status(self) -> GuestStatus:
        return GuestStatus(
            state=self.state,
            ticks=0,
            last_tick_ns=0,
            throttle_percent=self.throttles[-1] if self.throttles else 0,
            resume_gap_ms=None,
            pid=self.pid,
            memory_bytes=self.spec.memory_bytes,
        )

    def is_alive(self) -> bool:
        return not self.destroyed

    async def stop(self) -> None:
        self.state = "stopped"

    async def destroy(self) -> None:
        self.calls.append("destroy")
        if self.fail_destroy is not None:
            error, self.fail_destroy = self.fail_destroy, None
            raise error
        self.destroyed = True
        self.state = "stopped"

    def close(self) -> None:
        return None

    # -- post-copy (a target: PostCopyHandle) --

    def prepare_postcopy(self, missing: PageIndices) -> None:
        self._present = np.ones(self.spec.page_count, dtype=np.uint8)
        self._present[missing] = 0

    def present(self) -> npt.NDArray[np.uint8]:
        return self._present

    def mark_present(self, indices: PageIndices) -> None:
        self._present[indices] = 1

    def requested_pages(self) -> PageIndices:
        return np.empty(0, dtype=np.int64)  # this guest never faults

    def missing_pages(self) -> PageIndices:
        return np.flatnonzero(self._present == 0).astype(np.int64)

    async def resume_postcopy(self, device_state: bytes) -> None:
        self.calls.append("resume_postcopy")
        self.state = "running"

    async def finish_postcopy(self) -> GuestStatus:
        return await self.status()
