"""The qemu driver: guests are ``qemu-system-x86_64`` processes controlled over QMP.

Each guest is its own QEMU process, daemonised (``-daemonize``) in its own session, so
it is never the handler's child and outlives a handler restart. Files:

- ``<runtime_dir>/<vm_id>/vm.json``     spec, pid, paths (what adopt_all() reads)
- ``<runtime_dir>/<vm_id>/console.log`` the serial console (``vmferry console-log``)
- ``<runtime_dir>/<vm_id>/qemu.log``    QEMU's own stderr
- ``<ram_dir>/qemu-<tag>/<vm_id>.ram``  guest RAM: a ``memory-backend-file`` with
  ``share=on`` on tmpfs, so the handler maps the very pages the guest uses (the
  verified switchover compares and repairs them)
- ``<sock_dir>/<hash>.qmp``             QMP; sockets live in a short directory under
  /tmp because AF_UNIX paths are limited to 107 bytes

An incoming guest (migration target) starts with ``-incoming defer -S``: paused, waiting
for ``migrate-incoming``; it stays paused after the migration completes until the
handler resumes it (``cont``) once the hand-off is recorded.

Downtime as the guest saw it: the guest program prints a heartbeat on the serial
console every tick. Under TCG the guest's clocks stop while QEMU is paused, so the gap
is measured on the host: the time the first heartbeat reached the target's console
minus the time of the source console's last write before the pause (file mtimes, which
is why the console is a file).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from handler.drivers.base import (
    DriverError,
    GuestError,
    GuestSpec,
    GuestStartError,
    GuestStatus,
    PageIndices,
    PageMask,
    VMExistsError,
    VMHandle,
    unmap,
)
from vmferry.objects import schema

__all__ = ["QemuDriver", "QemuHandle", "QemuSpec", "kvm_usable", "qemu_binary"]

log = logging.getLogger(__name__)

DEFAULT_RAM_DIR = Path("/dev/shm/vmferry")
VM_JSON = "vm.json"
CONSOLE_LOG = "console.log"
QEMU_LOG = "qemu.log"
LAUNCH_TIMEOUT_S = 30.0  # until the daemonised QEMU wrote its pidfile
QMP_TIMEOUT_S = 10.0
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
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QemuSpec:
        data = dict(data)
        data["extra_args"] = tuple(data.get("extra_args") or ())
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
        self._qmp_lock = asyncio.Lock()
        self._mm: mmap.mmap | None = None

    @property
    def page_count(self) -> int:
        return self.spec.page_count

    # -- QMP ------------------------------------------------------------------------------

    async def _client(self) -> QMPClient:
        async with self._qmp_lock:
            if self._qmp is not None and self._qmp.runstate.name == "RUNNING":
                return self._qmp
            if self._qmp is not None:
                with contextlib.suppress(Exception):
                    await self._qmp.disconnect()
            client = QMPClient(f"vmferry-{self.vm_id[:13]}")
            try:
                async with asyncio.timeout(QMP_TIMEOUT_S):
                    await client.connect(str(self.qmp_path))
            except (ConnectError, OSError, TimeoutError) as e:
                raise GuestError(f"VM {self.vm_id}: cannot reach QEMU's QMP socket: {e}") from e
            self._qmp = client
            return client

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a QMP command; GuestError with QEMU's message when it fails."""
        client = await self._client()
        try:
            async with asyncio.timeout(QMP_TIMEOUT_S):
                return await client.execute(command, arguments)
        except ExecuteError as e:
            raise GuestError(f"VM {self.vm_id}: QEMU refused {command}: {e}") from e
        except (QMPError, OSError, TimeoutError, EOFError) as e:
            self._qmp = None
            raise GuestError(f"VM {self.vm_id}: QMP {command} failed: {e!r}") from e

    async def run_state(self) -> str:
        return str((await self.qmp("query-status"))["status"])

    # -- memory ---------------------------------------------------------------------------

    def ram(self) -> memoryview:
        if self._mm is None:
            fd = os.open(self.ram_path, os.O_RDWR | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                if size != self.qspec.memory_bytes:
                    raise DriverError(
                        f"{self.ram_path} is {size} bytes, expected {self.qspec.memory_bytes}"
                    )
                self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
        return memoryview(self._mm)

    def harvest_dirty(self) -> PageIndices:
        raise DriverError("qemu guests track dirty memory inside QEMU (use QEMU's migration)")

    def mark_all_dirty(self) -> None:
        raise DriverError("qemu guests track dirty memory inside QEMU")

    def clear_dirty(self) -> None:
        raise DriverError("qemu guests track dirty memory inside QEMU")

    def data_pages(self) -> PageMask | None:
        return None  # QEMU migrates its own memory

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

    async def device_state(self) -> bytes:
        return b""  # travels inside QEMU's migration stream

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
        mm, self._mm = self._mm, None
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

    def close(self) -> None:
        mm, self._mm = self._mm, None
        unmap(mm, f"qemu {self.vm_id}: RAM")
        client, self._qmp = self._qmp, None
        if client is not None:
            with contextlib.suppress(Exception):
                task = asyncio.get_running_loop().create_task(client.disconnect())
                del task


class QemuDriver:
    """Runs QEMU guests; one directory per VM under ``runtime_dir``."""

    name = "qemu"

    def __init__(
        self,
        runtime_dir: Path,
        ram_dir: Path = DEFAULT_RAM_DIR,
        *,
        binary: str = "qemu-system-x86_64",
        image_dir: Path | None = None,
    ) -> None:
        self.image_dir = image_dir  # default kernel (vmlinuz) and initrd (initrd.img)
        self.runtime_dir = Path(runtime_dir).absolute()
        tag = hashlib.sha256(str(self.runtime_dir.resolve()).encode()).hexdigest()[:12]
        self.tag = tag
        self.ram_dir = Path(ram_dir).absolute() / f"qemu-{tag}"
        self.sock_dir = Path(tempfile.gettempdir()) / f"vmferry-{tag}"
        self.binary = binary
        self._launching: set[str] = set()

    def available(self) -> str | None:
        """None when QEMU can run here, else the reason it cannot."""
        if qemu_binary(self.binary) is None:
            return (
                f"{self.binary} is not installed on this node "
                "(apt-get install qemu-system-x86, or `make install-qemu`)"
            )
        return None

    def spec_for(self, vmi: dict[str, Any]) -> QemuSpec:
        """The QemuSpec of a VMI's ``spec.qemu`` (memory from ``spec.domain``); a missing
        kernel/initrd defaults to the handler's guest image directory."""
        spec = vmi.get("spec") or {}
        q = spec.get("qemu") or {}
        kernel = q.get("kernel") or ""
        initrd = q.get("initrd") or ""
        if not kernel and self.image_dir is not None:
            kernel = str(self.image_dir / "vmlinuz")
            initrd = initrd or str(self.image_dir / "initrd.img")
        return QemuSpec(
            memory_bytes=schema.memory_bytes(spec),
            kernel=kernel,
            initrd=initrd,
            cmdline=q.get("cmdline") or DEFAULT_CMDLINE,
            accelerator=q.get("accelerator") or "",
            vcpus=int(q.get("vcpus") or 1),
            verify=q.get("verify") or "repair",
            extra_args=tuple(q.get("extraArgs") or ()),
        )

    def sock_path(self, vm_id: str, suffix: str) -> Path:
        digest = hashlib.sha256(vm_id.encode()).hexdigest()[:16]
        return self.sock_dir / f"{digest}.{suffix}"

    async def start(self, vm_id: str, spec: QemuSpec) -> QemuHandle:
        return await self._launch(vm_id, spec, incoming=False)

    async def prepare_incoming(self, vm_id: str, spec: QemuSpec) -> QemuHandle:
        """QEMU with ``-incoming defer -S``: paused, waiting for migrate-incoming."""
        return await self._launch(vm_id, spec, incoming=True)

    def _command(self, vm_id: str, spec: QemuSpec, ram_path: Path, vm_dir: Path) -> list[str]:
        mib = spec.memory_bytes >> 20
        args = [
            qemu_binary(self.binary) or self.binary,
            "-name",
            f"guest={vm_id}",
            "-machine",
            "pc,memory-backend=ram0",
            "-accel",
            spec.effective_accelerator(),
            "-smp",
            str(spec.vcpus),
            "-m",
            f"{mib}M",
            "-object",
            f"memory-backend-file,id=ram0,size={mib}M,mem-path={ram_path},share=on",
            "-kernel",
            spec.kernel,
            "-append",
            spec.cmdline,
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-chardev",
            f"file,id=console0,path={vm_dir / CONSOLE_LOG}",
            "-serial",
            "chardev:console0",
            "-qmp",
            f"unix:{self.sock_path(vm_id, 'qmp')},server=on,wait=off",
            "-daemonize",
            "-pidfile",
            str(vm_dir / "qemu.pid"),
        ]
        if spec.initrd:
            args += ["-initrd", spec.initrd]
        args += list(spec.extra_args)
        return args

    async def _launch(self, vm_id: str, spec: QemuSpec, incoming: bool) -> QemuHandle:
        if not _VM_ID_RE.fullmatch(vm_id):
            raise ValueError(f"vm_id {vm_id!r} is not filesystem-safe")
        problem = self.available()
        if problem:
            raise GuestStartError(f"VM {vm_id}: {problem}")
        for path in _missing_files(spec.kernel, spec.initrd):
            if path:
                raise GuestStartError(
                    f"VM {vm_id}: {path} does not exist on this node (build the guest image "
                    "with `make guest-image`, or fix spec.qemu.kernel/initrd)"
                )
        if vm_id in self._launching:
            raise VMExistsError(f"VM {vm_id} is already being started")
        vm_dir = self.runtime_dir / vm_id
        record = _read_record(vm_dir)
        if record and _is_qemu_of(int(record.get("pid", 0)), record.get("start_ticks"), vm_id):
            raise VMExistsError(f"VM {vm_id} already runs here (pid {record['pid']})")
        self._launching.add(vm_id)
        ram_path = self.ram_dir / f"{vm_id}.ram"
        qmp_path = self.sock_path(vm_id, "qmp")
        try:
            shutil.rmtree(vm_dir, ignore_errors=True)
            vm_dir.mkdir(parents=True, mode=0o700)
            for d in (self.ram_dir, self.sock_dir):
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
            ram_path.unlink(missing_ok=True)
            qmp_path.unlink(missing_ok=True)
            args = self._command(vm_id, spec, ram_path, vm_dir)
            if incoming:
                args += ["-incoming", "defer", "-S"]
            pid = await self._spawn(vm_id, args, vm_dir)
            start_ticks = _proc_start_ticks(pid)
            (vm_dir / VM_JSON).write_text(
                json.dumps(
                    {
                        "vm_id": vm_id,
                        "driver": "qemu",
                        "pid": pid,
                        "start_ticks": start_ticks,
                        "spec": spec.to_json(),
                        "ram_path": str(ram_path),
                        "qmp_path": str(qmp_path),
                        "dir": str(vm_dir),
                        "incoming": incoming,
                        "command": args,
                    }
                )
            )
            handle = QemuHandle(vm_id, spec, pid, start_ticks, vm_dir, ram_path, qmp_path, incoming)
            state = await handle.run_state()
            log.info("qemu %s: started pid %d (%s), state %s", vm_id, pid, args[6], state)
            return handle
        except BaseException:
            record = _read_record(vm_dir)
            pid_file = vm_dir / "qemu.pid"
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text().strip())
                if _is_qemu_of(pid, None, vm_id):
                    os.kill(pid, signal.SIGKILL)
            raise
        finally:
            self._launching.discard(vm_id)

    async def _spawn(self, vm_id: str, args: list[str], vm_dir: Path) -> int:
        log_fd = os.open(vm_dir / QEMU_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,
                cwd=vm_dir,
            )
        finally:
            os.close(log_fd)
        try:
            async with asyncio.timeout(LAUNCH_TIMEOUT_S):
                code = await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise GuestStartError(
                f"VM {vm_id}: QEMU did not daemonise within {LAUNCH_TIMEOUT_S:.0f}s"
            ) from None
        if code != 0:
            raise GuestStartError(
                f"VM {vm_id}: QEMU exited with code {code}: {_tail(vm_dir / QEMU_LOG)}"
            )
        try:
            return int((vm_dir / "qemu.pid").read_text().strip())
        except (OSError, ValueError) as e:
            raise GuestStartError(f"VM {vm_id}: QEMU wrote no pidfile: {e}") from None

    async def adopt_all(self) -> list[QemuHandle]:
        """Re-adopt the live QEMU guests of the runtime directory; delete dead ones."""
        handles: list[QemuHandle] = []
        if not self.runtime_dir.is_dir():
            return handles
        for vm_dir in sorted(p for p in self.runtime_dir.iterdir() if p.is_dir()):
            vm_id = vm_dir.name
            record = _read_record(vm_dir)
            if record is None or vm_id in self._launching:
                continue
            pid = int(record.get("pid", 0))
            if _is_qemu_of(pid, record.get("start_ticks"), vm_id):
                try:
                    handle = QemuHandle(
                        vm_id,
                        QemuSpec.from_json(record["spec"]),
                        pid,
                        record.get("start_ticks"),
                        vm_dir,
                        Path(record["ram_path"]),
                        Path(record["qmp_path"]),
                        bool(record.get("incoming")),
                    )
                except (KeyError, TypeError, ValueError) as e:
                    log.error("qemu %s: cannot adopt QEMU %d: %s", vm_id, pid, e)
                    continue
                log.info("qemu %s: adopted running QEMU %d", vm_id, pid)
                handles.append(handle)
            else:
                log.warning("qemu %s: QEMU %d is gone; removing its files", vm_id, pid)
                with contextlib.suppress(KeyError, OSError):
                    os.unlink(record["ram_path"])
                shutil.rmtree(vm_dir, ignore_errors=True)
        return handles


def _missing_files(*paths: str) -> list[str]:
    return [p for p in paths if p and not os.path.isfile(p)]


def _read_record(vm_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((vm_dir / VM_JSON).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _tail(path: Path, lines: int = 10) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


if TYPE_CHECKING:

    def _conforms(handle: QemuHandle) -> VMHandle:
        return handle  # mypy checks the handle against the VMHandle protocol
