"""The qemu driver: guests are ``qemu-system-x86_64`` processes controlled over QMP
(their handle and spec are in ``qemu_handle.py``).

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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handler.drivers.base import (
    DriverError,
    EngineContext,
    GuestError,
    GuestStartError,
    VMExistsError,
    VMHandle,
)
from handler.drivers.qemu_handle import (
    _VM_ID_RE,
    CONSOLE_LOG,
    DEFAULT_CMDLINE,
    DEFAULT_RAM_DIR,
    DRIVER_NAME,
    VM_JSON,
    DiskSpec,
    QemuHandle,
    QemuSpec,
    _is_qemu_of,
    _proc_start_ticks,
    kvm_usable,
    last_heartbeat,
    qemu_binary,
)
from handler.drivers.scope import NO_SCOPES, GuestScopes
from vmferry.objects import schema

if TYPE_CHECKING:
    from handler.drivers.base import Driver
    from handler.migration.source import SourceEngine
    from handler.volumes import VolumeResolver

__all__ = ["QemuDriver", "QemuHandle", "QemuSpec", "kvm_usable", "last_heartbeat", "qemu_binary"]

log = logging.getLogger(__name__)

QEMU_LOG = "qemu.log"
LAUNCH_TIMEOUT_S = 30.0  # until the daemonised QEMU wrote its pidfile
PREALLOC_THREADS = max(1, min(os.cpu_count() or 1, 8))  # prepare_incoming(prealloc=True)


class QemuDriver:
    """Runs QEMU guests; one directory per VM under ``runtime_dir``."""

    name = DRIVER_NAME

    def __init__(
        self,
        runtime_dir: Path,
        ram_dir: Path = DEFAULT_RAM_DIR,
        *,
        binary: str = "qemu-system-x86_64",
        image_dir: Path | None = None,
        scopes: GuestScopes = NO_SCOPES,
        volumes: VolumeResolver | None = None,
    ) -> None:
        self.scopes = scopes  # each guest in a systemd scope of its own (drivers/scope.py)
        self.image_dir = image_dir  # default kernel (vmlinuz) and initrd (initrd.img)
        self.volumes = volumes  # resolves a VMI's claim volumes to image files here
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

    def spec_for(self, vmi: dict[str, Any], disks: tuple[DiskSpec, ...] = ()) -> QemuSpec:
        """The QemuSpec of a VMI's ``spec.qemu`` (memory from ``spec.domain``); a missing
        kernel/initrd defaults to the handler's guest image directory. ``disks``: its
        claim volumes resolved on this node (``handler.volumes``)."""
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
            disks=disks,
        )

    def sock_path(self, vm_id: str, suffix: str) -> Path:
        digest = hashlib.sha256(vm_id.encode()).hexdigest()[:16]
        return self.sock_dir / f"{digest}.{suffix}"

    # -- the Driver interface -------------------------------------------------------------

    def claims(self, vmi: dict[str, Any]) -> bool:
        """VMIs with ``spec.qemu``."""
        return (vmi.get("spec") or {}).get("qemu") is not None

    async def _disks(self, vmi: dict[str, Any]) -> tuple[DiskSpec, ...]:
        return await self.volumes.disks(vmi) if self.volumes is not None else ()

    async def start_vmi(self, vm_id: str, vmi: dict[str, Any]) -> QemuHandle:
        return await self.start(vm_id, self.spec_for(vmi, await self._disks(vmi)))

    async def prepare_incoming_vmi(
        self, vm_id: str, vmi: dict[str, Any], *, postcopy: bool
    ) -> QemuHandle:
        """The target of a migration: a shared disk is opened at the same path, inactive
        (``-incoming``); with ``late-block-activate`` (``qemu_target``) QEMU activates it
        only at ``cont``, after the source flushed and inactivated it and after the
        hand-off was recorded. A non-shared disk is the destination of a storage
        migration: it is served to the source's mirror over NBD
        (``handler.migration.storage``)."""
        from handler.migration.storage import export_disks

        spec = self.spec_for(vmi, await self._disks(vmi))
        handle = await self.prepare_incoming(vm_id, spec, prealloc=not postcopy)
        try:
            await export_disks(handle, self.nbd_socket(vm_id))
        except GuestError as e:
            await handle.destroy()
            raise GuestStartError(f"VM {vm_id}: cannot export its disks over NBD: {e}") from None
        return handle

    def nbd_socket(self, vm_id: str) -> Path:
        """The incoming QEMU's NBD server (the destination disks of a storage migration)."""
        return self.sock_path(vm_id, "nbd")

    def source_engine(
        self, context: EngineContext, vmi: dict[str, Any], handle: VMHandle
    ) -> SourceEngine:
        """QEMU migrates the guest itself; the engine tunnels its stream and verifies."""
        from handler.migration.qemu_source import QemuSourceMigration

        if not isinstance(handle, QemuHandle):
            raise DriverError(f"a QEMU migration of {handle.driver_name} guest {handle.vm_id}")
        return QemuSourceMigration(
            context.api,
            context.node,
            vmi,
            handle,
            context.tls,
            self,
            on_progress=context.on_progress,
            peers=context.peers,
        )

    async def start(self, vm_id: str, spec: QemuSpec) -> QemuHandle:
        return await self._launch(vm_id, spec, incoming=False)

    async def prepare_incoming(
        self, vm_id: str, spec: QemuSpec, *, prealloc: bool = False
    ) -> QemuHandle:
        """QEMU with ``-incoming defer -S``: paused, waiting for migrate-incoming.

        ``prealloc``: QEMU allocates the RAM file's pages before it waits (~0.4 s per GiB,
        charged to the guest's own cgroup). Without it the target allocates them while it
        loads: its zero-page check reads each page, and reading a hole of the tmpfs file
        allocates and clears it, which stalled the incoming stream for up to ~0.9 s per
        2 GiB guest -- inside the pause when QEMU's stop-and-copy fell there. Not for a
        migration that may switch to post-copy: QEMU discards the whole RAM when the
        source advises post-copy (and then needs the holes, to fault on them). With
        ``prealloc`` the handler's own mapping of the RAM is made here too, its page
        tables filled (``QemuHandle.map_ram``): the switchover's digest then hashes
        without a page fault per page, inside the pause."""
        handle = await self._launch(vm_id, spec, incoming=True, prealloc=prealloc)
        if prealloc:
            try:
                await asyncio.to_thread(handle.map_ram)
            except (OSError, DriverError) as e:
                await handle.destroy()
                raise GuestStartError(f"VM {vm_id}: cannot map its RAM: {e}") from None
        return handle

    def _command(
        self,
        vm_id: str,
        spec: QemuSpec,
        ram_path: Path,
        vm_dir: Path,
        *,
        prealloc: bool = False,
    ) -> list[str]:
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
            f"memory-backend-file,id=ram0,size={mib}M,mem-path={ram_path},share=on"
            + (f",prealloc=on,prealloc-threads={PREALLOC_THREADS}" if prealloc else ""),
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
        for index, disk in enumerate(spec.disks):
            args += disk.qemu_args(index)
        args += list(spec.extra_args)
        return args

    async def _launch(
        self, vm_id: str, spec: QemuSpec, incoming: bool, prealloc: bool = False
    ) -> QemuHandle:
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
            args = self._command(vm_id, spec, ram_path, vm_dir, prealloc=prealloc)
            if incoming:
                args += ["-incoming", "defer", "-S"]
            pid = await self._spawn(vm_id, args, vm_dir)
            await self.scopes.place(vm_id, pid)
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

    def _conforms(driver: QemuDriver, handle: QemuHandle) -> tuple[Driver, VMHandle]:
        return driver, handle  # mypy checks both against the protocols
