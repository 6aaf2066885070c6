"""The qemu guest's handle and spec: one ``qemu-system-x86_64`` process, over QMP.

``QemuSpec`` is what a VMI's ``spec.qemu`` asks for; ``QemuHandle`` (a VMHandle) maps the
guest's RAM file, talks QMP and reads the serial console. The driver that starts and
adopts these processes, and the files they use, are described in ``qemu.py``.

Downtime as the guest saw it: the guest program prints a heartbeat on the serial
console every tick. Under TCG the guest's clocks stop while QEMU is paused, so the gap
is measured on the host: the time the first heartbeat reached the target's console
minus the time of the source console's last write before the pause (file mtimes, which
is why the console is a file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError

from handler.drivers.base import (
    DriverError,
    GuestError,
    GuestSpec,
    GuestStatus,
    unmap,
)

__all__ = ["DRIVER_NAME", "QemuHandle", "QemuSpec", "kvm_usable", "last_heartbeat", "qemu_binary"]


log = logging.getLogger(__name__)

DRIVER_NAME = "qemu"
DEFAULT_RAM_DIR = Path("/dev/shm/vmferry")
VM_JSON = "vm.json"
CONSOLE_LOG = "console.log"
QMP_TIMEOUT_S = 10.0
EVENT_POLL_S = 0.05  # wait_migration polls this often besides QEMU's MIGRATION events
STOP_TIMEOUT_S = 5.0
HEARTBEAT_WAIT_S = 1.5  # how long resume() waits for the guest's first heartbeat
VERIFY_MODES = ("off", "detect", "repair")
DEFAULT_CMDLINE = "console=ttyS0 quiet panic=-1"
ACCELERATORS = ("kvm", "tcg")
_VM_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HB_RE = re.compile(rb"^HB (\d+) (\d+) ", re.M)
PANIC_MARKERS = ("Kernel panic", "CORRUPT page=")


def qemu_binary(name: str = "qemu-system-x86_64") -> str | None:
    """The QEMU binary's path, or None when it is not installed."""
    return shutil.which(name)


def kvm_usable() -> bool:
    """True when /dev/kvm opens read/write and the CPU has hardware virtualisation
    (vmx/svm). A /dev/kvm without them (e.g. the paravirtual kvm-pvm module inside a
    cloud VM) runs only PVM-aware guest kernels, so it does not count."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    if not re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M):
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


@dataclass(frozen=True)
class DiskSpec:
    """A disk image attached to the guest (a bound claim's raw image on this node).

    ``cache=none`` (O_DIRECT, no host page cache): what the guest wrote is on the image,
    not in one host's cache, when a shared disk is handed to another node."""

    name: str  # the VMI's volume name; the virtio serial the guest sees
    path: str
    bus: str = "virtio"
    shared: bool = False  # ReadWriteMany: both ends of a migration open it

    def __post_init__(self) -> None:
        if self.bus != "virtio":
            raise ValueError(
                f'volume "{self.name}": disk bus {self.bus} is not supported by the qemu '
                "driver (use virtio)"
            )

    def qemu_args(self, index: int) -> list[str]:
        """``-blockdev`` file + raw and a virtio-blk device; cache=none (``cache.direct``),
        native AIO. Block nodes are named by index (QEMU limits node names to 31
        characters); the guest sees the volume name as the disk's serial (20 at most)."""
        path = self.path.replace(",", ",,")  # QEMU's option syntax escapes commas
        return [
            "-blockdev",
            f"driver=file,node-name=vf{index},filename={path},cache.direct=on,aio=native",
            "-blockdev",
            f"driver=raw,node-name=vd{index},file=vf{index},cache.direct=on",
            "-device",
            f"virtio-blk-pci,drive=vd{index},serial={self.name[:20]}",
        ]


@dataclass(frozen=True)
class QemuSpec:
    """A QEMU guest: direct kernel boot (kernel + initrd + cmdline), RAM, vCPUs."""

    memory_bytes: int
    kernel: str
    initrd: str = ""
    cmdline: str = DEFAULT_CMDLINE
    accelerator: str = ""  # kvm|tcg; "" = kvm when usable, else tcg
    vcpus: int = 1
    verify: str = "repair"
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    disks: tuple[DiskSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.memory_bytes < (16 << 20) or self.memory_bytes % (2 << 20):
            raise ValueError(
                f"qemu: memory must be a multiple of 2 MiB and at least 16 MiB, "
                f"got {self.memory_bytes} bytes"
            )
        if not self.kernel:
            raise ValueError("qemu.kernel: required (a kernel image path on the node)")
        if self.accelerator not in ("", *ACCELERATORS):
            raise ValueError(f"qemu.accelerator: expected kvm or tcg, got {self.accelerator!r}")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"qemu.verify: expected off, detect or repair, got {self.verify!r}")
        if self.vcpus < 1:
            raise ValueError(f"qemu.vcpus: must be >= 1, got {self.vcpus}")

    def effective_accelerator(self) -> str:
        return self.accelerator or ("kvm" if kvm_usable() else "tcg")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["extra_args"] = list(self.extra_args)
        out["disks"] = [asdict(d) for d in self.disks]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QemuSpec:
        data = dict(data)
        data["extra_args"] = tuple(data.get("extra_args") or ())
        data["disks"] = tuple(DiskSpec(**d) for d in data.get("disks") or ())
        return cls(**data)


def _proc_start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _is_qemu_of(pid: int, start_ticks: int | None, vm_id: str) -> bool:
    """True when ``pid`` is the live QEMU process of ``vm_id`` (not a reused pid)."""
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if state in ("Z", "X"):
        return False
    if start_ticks is not None and _proc_start_ticks(pid) != start_ticks:
        return False
    return b"qemu-system" in cmdline[0] and f"guest={vm_id}".encode() in cmdline


def last_heartbeat(console: bytes) -> tuple[int, int] | None:
    """(seq, guest monotonic ns) of the last heartbeat line in console output."""
    found = None
    for m in _HB_RE.finditer(console):
        found = m
    return (int(found.group(1)), int(found.group(2))) if found else None


class QemuHandle:
    """One QEMU guest: QMP control, its RAM file mapped, its console log."""

    def __init__(
        self,
        vm_id: str,
        qspec: QemuSpec,
        pid: int,
        start_ticks: int | None,
        vm_dir: Path,
        ram_path: Path,
        qmp_path: Path,
        incoming: bool,
    ) -> None:
        self.vm_id = vm_id
        self.qspec = qspec
        self.spec = GuestSpec(memory_bytes=qspec.memory_bytes)  # geometry for the protocols
        self.pid = pid
        self.start_ticks = start_ticks
        self.vm_dir = vm_dir
        self.ram_path = ram_path
        self.qmp_path = qmp_path
        self.incoming = incoming
        self.console_path = vm_dir / CONSOLE_LOG
        self.resume_gap_ms: float | None = None
        self.source_last_console_ns: int = 0  # set on a target by the tunnel
        self._qmp: QMPClient | None = None
        self._qmp_stale = False  # a command failed on it: the next one opens a new session
        self._qmp_lock = asyncio.Lock()
        self._mm: mmap.mmap | None = None
        self._mm_lock = threading.Lock()  # map_ram() runs in a worker thread
        self._mm_closed = False

    @property
    def page_count(self) -> int:
        return self.spec.page_count

    @property
    def driver_name(self) -> str:
        return DRIVER_NAME

    # -- QMP ------------------------------------------------------------------------------

    async def _client(self) -> QMPClient:
        async with self._qmp_lock:
            if (
                self._qmp is not None
                and self._qmp.runstate.name == "RUNNING"
                and not self._qmp_stale
            ):
                return self._qmp
            if self._qmp is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(QMP_TIMEOUT_S):
                        await self._qmp.disconnect()
                self._qmp = None
            self._qmp_stale = False
            client = QMPClient(f"vmferry-{self.vm_id[:13]}")
            try:
                async with asyncio.timeout(QMP_TIMEOUT_S):
                    await client.connect(str(self.qmp_path))
            except (ConnectError, OSError, TimeoutError) as e:
                raise GuestError(f"VM {self.vm_id}: cannot reach QEMU's QMP socket: {e}") from e
            self._qmp = client
            return client

    async def qmp(
        self, command: str, arguments: dict[str, Any] | None = None, *, oob: bool = False
    ) -> Any:
        """Run a QMP command; GuestError with QEMU's message when it fails. ``oob``:
        out-of-band (``exec-oob``), run by QEMU's monitor thread even while its main
        thread is blocked -- as in a paused post-copy, where it may wait on a page that
        cannot come (QEMU marks such commands ``allow-oob``: migrate-recover,
        migrate-pause)."""
        client = await self._client()
        try:
            async with asyncio.timeout(QMP_TIMEOUT_S):
                return await client.execute(command, arguments, oob=oob)
        except ExecuteError as e:
            raise GuestError(f"VM {self.vm_id}: QEMU refused {command}: {e}") from e
        except (QMPError, OSError, TimeoutError, EOFError) as e:
            # A new session next time; this one is closed (QEMU's QMP socket serves one
            # client at a time: a session left open would keep the next one waiting).
            self._qmp_stale = True
            raise GuestError(f"VM {self.vm_id}: QMP {command} failed: {e!r}") from e

    async def wait_migration(self, statuses: Collection[str], timeout: float) -> dict[str, Any]:
        """``query-migrate`` until its status is one of ``statuses`` or ``timeout`` s passed
        (returns the last answer either way): each of QEMU's MIGRATION events (migration
        capability ``events``) wakes it at once, a poll every EVENT_POLL_S otherwise."""
        deadline = time.monotonic() + timeout
        async with self.migration_events() as wake:
            while True:
                info: dict[str, Any] = await self.qmp("query-migrate")
                remaining = deadline - time.monotonic()
                if info.get("status") in statuses or remaining <= 0:
                    return info
                await wake(min(remaining, EVENT_POLL_S))

    @contextlib.asynccontextmanager
    async def migration_events(self) -> AsyncIterator[Callable[[float], Awaitable[None]]]:
        """While open, ``await wake(t)`` returns at QEMU's next MIGRATION event (the
        migration capability ``events``) or after ``t`` seconds, whichever comes first;
        an event that came between two calls wakes the next one at once."""
        client = await self._client()
        listener = EventListener("MIGRATION")

        async def wake(timeout: float) -> None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await listener.get()

        with client.listen(listener):
            yield wake

    async def run_state(self) -> str:
        return str((await self.qmp("query-status"))["status"])

    # -- memory ---------------------------------------------------------------------------

    def ram(self) -> memoryview:
        return memoryview(self._mapping(populate=False))

    def map_ram(self) -> None:
        """Map the guest's RAM here with its page tables filled (``MAP_POPULATE``), so
        that hashing it later -- the switchover's digest, inside the pause -- takes no
        page fault per page: measured here, a fresh mapping's first digest of 2 GiB took
        681 ms, a populated one's 70 ms. Blocking (the kernel fills the tables, ~0.3-0.8 s
        per 2 GiB, without the GIL): call it in a worker thread, before the pause. A
        mapping that exists already is kept (its pages were touched by its last digest).
        Reading a hole of the tmpfs file allocates it, as the digest would."""
        self._mapping(populate=True)

    def _mapping(self, populate: bool) -> mmap.mmap:
        """This handle's one mapping of the RAM file, made on first use. The lock is
        never held across the mmap itself (populating 2 GiB takes up to ~0.8 s): a caller
        on the event loop (ram(), destroy()) never waits for map_ram() in its thread; of
        two mappings made at once, the first installed is kept."""
        with self._mm_lock:
            if self._mm_closed:
                raise DriverError(f"qemu {self.vm_id}: its RAM is unmapped (destroyed)")
            if self._mm is not None:
                return self._mm
        fd = os.open(self.ram_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size != self.qspec.memory_bytes:
                raise DriverError(
                    f"{self.ram_path} is {size} bytes, expected {self.qspec.memory_bytes}"
                )
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
            mm = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        with self._mm_lock:
            if self._mm is None and not self._mm_closed:
                self._mm = mm
                return mm
            kept, closed = self._mm, self._mm_closed
        mm.close()
        if closed or kept is None:
            raise DriverError(f"qemu {self.vm_id}: its RAM is unmapped (destroyed)")
        return kept

    # -- control --------------------------------------------------------------------------

    async def pause(self) -> None:
        await self.qmp("stop")

    async def resume(self, device_state: bytes | None = None) -> None:
        """``cont``. For an incoming guest, also measure the downtime the guest saw:
        waits (at most HEARTBEAT_WAIT_S) for its first heartbeat on this console."""
        del device_state  # QEMU carries the device state in its own stream
        before = self.console_path.stat().st_size if self.console_path.exists() else 0
        await self.qmp("cont")
        if self.incoming:
            self.incoming = False
            await asyncio.to_thread(self._write_record)
            if self.source_last_console_ns:
                self.resume_gap_ms = await self._first_heartbeat_gap(before)

    async def _first_heartbeat_gap(self, offset: int) -> float | None:
        deadline = time.monotonic() + HEARTBEAT_WAIT_S
        while time.monotonic() < deadline:
            try:
                st = self.console_path.stat()
                if st.st_size > offset:
                    with self.console_path.open("rb") as f:
                        f.seek(offset)
                        if b"HB " in f.read():
                            return (st.st_mtime_ns - self.source_last_console_ns) / 1e6
            except OSError:
                pass
            await asyncio.sleep(0.005)
        return None

    def console_mtime_ns(self) -> int:
        try:
            return self.console_path.stat().st_mtime_ns
        except OSError:
            return 0

    def console_text(self) -> str:
        try:
            return self.console_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    async def set_throttle(self, percent: int) -> None:
        await self.qmp(
            "migrate-set-parameters",
            {"cpu-throttle-initial": max(1, percent), "cpu-throttle-increment": 10},
        )

    async def status(self) -> GuestStatus:
        if not self.is_alive():
            state = "stopped"
        else:
            try:
                qstate = await self.run_state()
            except GuestError:
                if not self.is_alive():
                    qstate = "shutdown"
                else:
                    raise
            if qstate == "running":
                state = "running"
            elif qstate in ("shutdown", "guest-panicked", "internal-error"):
                state = "stopped"
            else:
                state = "incoming" if self.incoming else "paused"
        hb = last_heartbeat(self._console_tail())
        return GuestStatus(
            state=state,
            ticks=hb[0] if hb else 0,
            last_tick_ns=hb[1] if hb else 0,
            throttle_percent=0,
            resume_gap_ms=self.resume_gap_ms,
            pid=self.pid,
            memory_bytes=self.qspec.memory_bytes,
        )

    def _console_tail(self, size: int = 4096) -> bytes:
        try:
            with self.console_path.open("rb") as f:
                f.seek(max(0, self.console_path.stat().st_size - size))
                return f.read()
        except OSError:
            return b""

    def _write_record(self) -> None:
        path = self.vm_dir / VM_JSON
        record = json.loads(path.read_text())
        record["incoming"] = self.incoming
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)

    # -- process --------------------------------------------------------------------------

    def is_alive(self) -> bool:
        return _is_qemu_of(self.pid, self.start_ticks, self.vm_id)

    async def _wait_gone(self, limit: float) -> bool:
        deadline = time.monotonic() + limit
        while self.is_alive():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self) -> None:
        if not self.is_alive():
            return
        with contextlib.suppress(GuestError):
            await self.qmp("quit")
        if not await self._wait_gone(STOP_TIMEOUT_S):
            await self._kill()

    async def _kill(self) -> None:
        if self.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        await self._wait_gone(STOP_TIMEOUT_S)

    async def destroy(self) -> None:
        await self._disconnect()
        await self._kill()
        mm = self._take_mapping()
        self.close()
        # Unmapping a large guest's RAM and freeing its file's pages take a while (1 GiB:
        # tens of ms to unmap, ~230 ms to free the tmpfs pages here): not on the event loop.
        await asyncio.to_thread(self._unmap_and_delete, mm)

    def _unmap_and_delete(self, mm: mmap.mmap | None) -> None:
        unmap(mm, f"qemu {self.vm_id}: RAM")
        self.ram_path.unlink(missing_ok=True)
        self.qmp_path.unlink(missing_ok=True)
        shutil.rmtree(self.vm_dir, ignore_errors=True)

    async def _disconnect(self) -> None:
        client, self._qmp = self._qmp, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.disconnect()

    def _take_mapping(self) -> mmap.mmap | None:
        with self._mm_lock:
            mm, self._mm = self._mm, None
            self._mm_closed = True
            return mm

    def close(self) -> None:
        unmap(self._take_mapping(), f"qemu {self.vm_id}: RAM")
        client, self._qmp = self._qmp, None
        if client is not None:
            with contextlib.suppress(Exception):
                task = asyncio.get_running_loop().create_task(client.disconnect())
                del task
