"""The QEMU peer: QEMU's own live migration of a paused guest on this machine.

Two ``qemu-system-x86_64`` processes (``-machine none``, no kernel, ``-S``: the guest
never runs, so nothing dirties memory) whose RAM is a ``memory-backend-file`` in
/dev/shm; the source's file is pre-filled by :mod:`bench.content` with the memvm guest's
own content generator. Migration over TCP loopback, plain or TLS (``tls-creds-x509``
with certificates from the project's PKI: EC P-256, the same kind the handlers use),
single stream or multifd; ``max-bandwidth`` is lifted so QEMU is not capped at its
default 128 MiB/s. Timing: wall clock from the ``migrate`` command until the *target*
reports ``completed`` (its RAM is loaded), plus QEMU's own ``total-time``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmferry import pki
from vmferry.lab import free_port

QEMU = "qemu-system-x86_64"
UNLIMITED_BANDWIDTH = 1 << 40  # bytes/s: QEMU's default max-bandwidth is 128 MiB/s
TIMEOUT = 300.0


def available() -> bool:
    return shutil.which(QEMU) is not None


def version() -> str:
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.stdout.splitlines()[0] if out.stdout else ""


@dataclass(frozen=True)
class QemuMode:
    tls: bool
    multifd_channels: int  # 0 = the classic single stream
    compression: str = ""  # multifd-compression (zlib|zstd); "" = none

    @property
    def name(self) -> str:
        parts = ["qemu", "tls" if self.tls else "plain"]
        parts.append(f"multifd{self.multifd_channels}" if self.multifd_channels else "single")
        if self.compression:
            parts.append(self.compression)
        return "-".join(parts)


class Qmp:
    """A minimal QMP client over a unix socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path, timeout: float = 10.0) -> Qmp:
        deadline = time.monotonic() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)
        qmp = cls(reader, writer)
        await qmp._read_reply()  # greeting
        await qmp.execute("qmp_capabilities")
        return qmp

    async def _read_reply(self) -> dict[str, Any]:
        while True:
            line = await self.reader.readline()
            if not line:
                raise RuntimeError("QEMU closed its QMP socket")
            msg: dict[str, Any] = json.loads(line)
            if "event" in msg:
                continue
            return msg

    async def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.writer.write(json.dumps(request).encode() + b"\n")
        await self.writer.drain()
        reply = await self._read_reply()
        if "error" in reply:
            raise RuntimeError(f"QMP {command} failed: {reply['error'].get('desc')}")
        return reply.get("return")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass(frozen=True)
class Placement:
    """Where the two QEMU processes run: argv prefixes (e.g. ``ip netns exec NS``) and the
    address the target listens on (the default: both on this host's loopback)."""

    source_prefix: tuple[str, ...] = ()
    target_prefix: tuple[str, ...] = ()
    target_host: str = "127.0.0.1"


LOOPBACK = Placement()


def make_tls_dirs(root: Path, ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path]:
    """QEMU's x509 directories (server, client) with certificates issued by a fresh
    project CA (naming ``ips``): ``ca-cert.pem``, ``server-cert.pem``/``-key.pem``,
    ``client-cert.pem``/``-key.pem``."""
    pki_dir = root / "pki"
    pki.init_ca(pki_dir, "vmferry-bench")
    tls = pki.issue_node(pki_dir, "bench-qemu", ips=list(ips), dns=["localhost"])
    server, client = root / "tls-server", root / "tls-client"
    for d, role in ((server, "server"), (client, "client")):
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(tls.ca, d / "ca-cert.pem")
        shutil.copy(tls.cert, d / f"{role}-cert.pem")
        shutil.copy(tls.key, d / f"{role}-key.pem")
    return server, client


def _argv(
    ram_file: Path, memory_bytes: int, qmp_sock: Path, tls_dir: Path | None, endpoint: str
) -> list[str]:
    argv = [
        QEMU,
        "-nodefaults",
        "-nographic",
        "-display",
        "none",
        "-S",
        "-machine",
        "none,memory-backend=ram0",
        "-m",
        f"{memory_bytes // (1 << 20)}M",
        "-object",
        f"memory-backend-file,id=ram0,size={memory_bytes},mem-path={ram_file},share=on",
        "-qmp",
        f"unix:{qmp_sock},server=on,wait=off",
        "-serial",
        "none",
        "-monitor",
        "none",
    ]
    if tls_dir is not None:
        argv += [
            "-object",
            f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint={endpoint},verify-peer=on",
        ]
    if endpoint == "server":
        argv += ["-incoming", "defer"]
    return argv


def _launch(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log
        )


async def _poll_completed(qmp: Qmp, deadline: float, period: float = 0.005) -> dict[str, Any]:
    while True:
        info: dict[str, Any] = await qmp.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"QEMU migration {status}: {info.get('error-desc', '')}")
        if time.monotonic() > deadline:
            raise TimeoutError("QEMU migration did not complete in time")
        await asyncio.sleep(period)


async def migrate_once(
    source_ram: Path,
    memory_bytes: int,
    mode: QemuMode,
    workdir: Path,
    tls_dirs: tuple[Path, Path] | None,
    placement: Placement = LOOPBACK,
) -> dict[str, Any]:
    """One QEMU migration of the pre-filled ``source_ram``; returns its measurements."""
    target_ram = workdir / "target.ram"
    target_ram.unlink(missing_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    qmps: list[Qmp] = []
    try:
        sockets = (workdir / "src.qmp", workdir / "dst.qmp")
        for s in sockets:
            s.unlink(missing_ok=True)
        server_tls = tls_dirs[0] if (tls_dirs and mode.tls) else None
        client_tls = tls_dirs[1] if (tls_dirs and mode.tls) else None
        for argv in (
            [
                *placement.source_prefix,
                *_argv(source_ram, memory_bytes, sockets[0], client_tls, "client"),
            ],
            [
                *placement.target_prefix,
                *_argv(target_ram, memory_bytes, sockets[1], server_tls, "server"),
            ],
        ):
            procs.append(_launch(argv, workdir / "qemu.log"))
        src = await Qmp.connect(sockets[0])
        qmps.append(src)
        dst = await Qmp.connect(sockets[1])
        qmps.append(dst)
        caps = [{"capability": "multifd", "state": bool(mode.multifd_channels)}]
        params: dict[str, Any] = {"max-bandwidth": UNLIMITED_BANDWIDTH, "downtime-limit": 300}
        if mode.multifd_channels:
            params["multifd-channels"] = mode.multifd_channels
            if mode.compression:
                params["multifd-compression"] = mode.compression
        for qmp, side_params in ((src, params), (dst, params)):
            await qmp.execute("migrate-set-capabilities", capabilities=caps)
            p = dict(side_params)
            if mode.tls:
                p["tls-creds"] = "tls0"
            if qmp is dst:
                p.pop("max-bandwidth", None)
                p.pop("downtime-limit", None)
            await qmp.execute("migrate-set-parameters", **p)
        port = free_port("127.0.0.1")  # free here; in a node's own namespace as good as free
        uri = f"tcp:{placement.target_host}:{port}"
        await dst.execute("migrate-incoming", uri=uri)
        started = time.monotonic()
        await src.execute("migrate", uri=uri)
        deadline = started + TIMEOUT
        src_info = await _poll_completed(src, deadline)
        await _poll_completed(dst, deadline)
        seconds = time.monotonic() - started
        ram = src_info.get("ram", {})
        return {
            "seconds": seconds,
            "qemuTotalSeconds": src_info.get("total-time", 0) / 1000,
            "qemuDowntimeMilliseconds": src_info.get("downtime"),
            "wireBytes": ram.get("transferred"),
            "zeroPages": ram.get("duplicate"),
            "normalPages": ram.get("normal"),
            "memoryBytes": memory_bytes,
            "throughput": memory_bytes / seconds,
        }
    finally:
        for qmp in qmps:
            with contextlib.suppress(Exception):
                await qmp.execute("quit")
            await qmp.close()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        target_ram.unlink(missing_ok=True)


class QemuPeer:
    """One pre-filled source RAM file (in /dev/shm) migrated by QEMU in several modes."""

    def __init__(
        self,
        memory_bytes: int,
        content: str,
        touched_bytes: int = 0,
        placement: Placement = LOOPBACK,
    ) -> None:
        self.placement = placement
        self.memory_bytes = memory_bytes
        self.content = content
        self.touched_bytes = touched_bytes
        self._tmp = tempfile.TemporaryDirectory(prefix="vmferry-bench-qemu-", dir="/dev/shm")
        self.workdir = Path(self._tmp.name)
        self.source_ram = self.workdir / "source.ram"
        self.tls_dirs: tuple[Path, Path] | None = None

    async def prepare(self) -> None:
        from bench.content import fill_ram_file

        self.tls_dirs = make_tls_dirs(
            self.workdir, tuple(dict.fromkeys(["127.0.0.1", self.placement.target_host]))
        )
        await asyncio.to_thread(
            fill_ram_file, self.source_ram, self.memory_bytes, self.content, self.touched_bytes
        )

    async def migrate(self, mode: QemuMode) -> dict[str, Any]:
        try:
            return await migrate_once(
                self.source_ram,
                self.memory_bytes,
                mode,
                self.workdir,
                self.tls_dirs,
                self.placement,
            )
        except (RuntimeError, TimeoutError, OSError) as e:
            return {"error": str(e)}

    def close(self) -> None:
        self._tmp.cleanup()
