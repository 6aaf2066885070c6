"""The qemu scenario (``python -m bench.run --scenario qemu``): the TCG test guest
migrated through vmferry's QEMU driver (the tunnel, the verified switchover), next to
QEMU's own TLS migration of the same guest without vmferry.

- vmferry: a 2-node lab; one VM per (memory, load, verify mode), migrated back and forth
  ``runs`` times per stream count (``liveMigrationConfig.parallelStreams``: 1 = one
  tunnel stream, 2 = main + 1 multifd channel... QEMU's multifd channels are
  ``streams``). Figures per migration (``bench/lab_runs.py``): throughput (memory bytes /
  the source handler's whole migration), total time, guest-seen downtime (the
  heartbeat gap the handlers measure: the source console's last write to the target's
  first), pages repaired, and the switchover's steps (``downtimePartsMilliseconds``:
  QEMU's stop-and-copy, the tunnel's drain, verify, resume; and
  ``switchoverStepsMilliseconds``: the digest on each side, the compare, the repair).
- QEMU alone: the same kernel, initrd and command line in two ``qemu-system-x86_64``
  processes on this host, TLS over TCP loopback (certificates from the project's PKI,
  bench/qemu.py), single stream and multifd with ``streams`` channels. Throughput is the
  memory size over the time from ``migrate`` until the target reports ``completed``;
  the guest-seen downtime is measured the way the handler does (the source console's
  last write to the target console's first).

Every run checks the target's console for a kernel panic or a ``CORRUPT`` page (a lost
page that reached a resumed guest).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import qemu
from bench.lab_runs import NAMESPACE, LabBench
from bench.stats import Summary, fmt_ratio, fmt_summary, median_of, ratio, summaries
from bench.storage_runs import guest_image
from vmferry.migration_state import ConfigKey, MigrationPhase
from vmferry.objects.quantity import parse_quantity

Obj = dict[str, Any]
MiB = 1 << 20
HB = re.compile(r"^HB \d+ ", re.M)
BOOT_TIMEOUT = 240.0
TIMEOUT = 300.0
DIRTY_RATE_MIB = 16  # memload.rate of the dirtying guests
OUR_KEYS = [
    "throughput",
    "wireRate",
    "migrationSeconds",
    "guestDowntimeMilliseconds",
    "downtimeMilliseconds",
    "repairedPages",
    "downtime_qemu_stop_copy",
    "downtime_drain",
    "downtime_verify",
    "downtime_resume",
    "step_source_digest",
    "step_target_digest",
    "step_compare",
    "step_repair",
]
PEER_KEYS = [
    "throughput",
    "wireRate",
    "seconds",
    "qemuDowntimeMilliseconds",
    "guestDowntimeMilliseconds",
]


@dataclass(frozen=True)
class Guest:
    """One VM of the scenario: its size, load and verify mode, and the stream counts it
    is migrated with."""

    memory: str
    dirtying: bool
    verify: str
    streams: tuple[int, ...]

    @property
    def memory_bytes(self) -> int:
        return parse_quantity(self.memory)

    @property
    def load(self) -> str:
        return "dirtying" if self.dirtying else "idle"

    @property
    def name(self) -> str:
        return f"q{self.memory.lower()}-{self.load[:4]}-{self.verify}"

    @property
    def cmdline(self) -> str:
        fill = self.memory_bytes * 3 // 4 // MiB  # most of RAM carries data
        rate = DIRTY_RATE_MIB if self.dirtying else 0
        return (
            f"console=ttyS0 quiet panic=-1 memload.fill={fill} memload.rate={rate} memload.tick=50"
        )

    def key(self, streams: int) -> str:
        return f"{self.memory} {self.load} verify={self.verify} streams={streams}"


def plan(quick: bool) -> list[Guest]:
    """The guests: --quick is one 512 MiB idle guest with repair (1 and 2 streams) and
    one without verification; the full run covers 512 MiB and 2 GiB, idle and
    dirtying, repair at 1 and 2 streams, detect and off at 1."""
    if quick:
        return [Guest("512Mi", False, "repair", (1, 2)), Guest("512Mi", False, "off", (1,))]
    out = []
    for memory in ("512Mi", "2Gi"):
        for dirtying in (False, True):
            out.append(Guest(memory, dirtying, "repair", (1, 2)))
            out.append(Guest(memory, dirtying, "detect", (1,)))
            out.append(Guest(memory, dirtying, "off", (1,)))
    return out


def peer_modes(streams: int) -> list[qemu.QemuMode]:
    return [
        qemu.QemuMode(tls=True, multifd_channels=0),
        qemu.QemuMode(tls=True, multifd_channels=streams),
    ]


def vm_manifest(guest: Guest, image: Path) -> Obj:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": guest.name, "namespace": NAMESPACE},
        "spec": {
            "runStrategy": "Always",
            "template": {
                "spec": {
                    "domain": {"memory": {"guest": guest.memory}},
                    "qemu": {
                        "kernel": str(image / "vmlinuz"),
                        "initrd": str(image / "initrd.img"),
                        "cmdline": guest.cmdline,
                        "accelerator": "tcg",
                        "verify": guest.verify,
                    },
                }
            },
        },
    }


def console_trouble(text: str) -> str | None:
    """What went wrong in a guest's console (a panic, a page the guest found changed)."""
    for marker in ("Kernel panic", "CORRUPT"):
        at = text.find(marker)
        if at >= 0:
            return text[at : at + 160].splitlines()[0]
    return None


# -- vmferry ---------------------------------------------------------------------------


class QemuLab:
    """The lab's view of QEMU guests: where their consoles are."""

    def __init__(self, bench: LabBench) -> None:
        self.bench = bench

    async def console(self, name: str) -> str:
        async with self.bench.api() as api:
            vmi = await api.get("VirtualMachineInstance", NAMESPACE, name)
        uid, node = vmi["metadata"]["uid"], vmi["status"]["nodeName"]
        qemu_dir = self.bench.lab.runtime_dir(node) / "qemu"
        texts = [p.read_text(errors="replace") for p in qemu_dir.glob(f"{uid}*/console.log")]
        return max(texts, key=len, default="")

    async def wait_heartbeats(self, name: str, count: int = 20) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if len(HB.findall(await self.console(name))) >= count:
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"{name}'s guest printed no heartbeats within {BOOT_TIMEOUT:.0f}s")


def our_record(rec: Obj) -> Obj:
    """The lab record plus the QEMU driver's own figures, flattened for summaries."""
    transfer = rec.get("transfer") or {}
    rec["repairedPages"] = transfer.get("repairedPages")
    # the tunnel's own rate: QEMU's stream bytes over `migrate` -> QEMU completed
    rec["wireRate"] = transfer.get("averageWireRateBytes")
    for step, value in (transfer.get("switchoverStepsMilliseconds") or {}).items():
        rec[f"step_{step}"] = value
    return rec


async def run_vmferry(
    bench: LabBench, guests: list[Guest], runs: int, image: Path, log: Callable[[str], None]
) -> dict[str, Obj]:
    lab = QemuLab(bench)
    results: dict[str, Obj] = {}
    for guest in guests:
        log(f"qemu: booting {guest.name} ({guest.cmdline})")
        await bench.create_vm(vm_manifest(guest, image))
        try:
            await lab.wait_heartbeats(guest.name)
            for streams in guest.streams:
                await bench.set_live_migration_config({ConfigKey.PARALLEL_STREAMS: streams})
                records = []
                for i in range(runs):
                    rec = our_record(await bench.migrate(guest.name))
                    await asyncio.sleep(1.0)  # heartbeats on the target
                    rec["consoleTrouble"] = console_trouble(await lab.console(guest.name))
                    records.append(rec)
                    log(
                        f"  {guest.key(streams)} #{i + 1}: {rec.get('phase')} "
                        f"{(rec.get('throughput') or 0) / MiB:.1f} MiB/s "
                        f"{rec.get('migrationSeconds') or 0:.2f} s, guest gap "
                        f"{rec.get('guestDowntimeMilliseconds')} ms, repaired "
                        f"{rec.get('repairedPages')}, parts {rec['transfer'].get('downtimePartsMilliseconds')}"
                        f" steps {rec['transfer'].get('switchoverStepsMilliseconds')}"
                        + (f" TROUBLE {rec['consoleTrouble']}" if rec["consoleTrouble"] else "")
                        + (
                            f" FAILED {rec.get('failureReason')}"
                            if rec.get("phase") != MigrationPhase.SUCCEEDED
                            else ""
                        )
                    )
                ok = [r for r in records if r.get("phase") == MigrationPhase.SUCCEEDED]
                results[guest.key(streams)] = {
                    "memoryBytes": guest.memory_bytes,
                    "streams": streams,
                    "verify": guest.verify,
                    "load": guest.load,
                    "records": records,
                    "failed": len(records) - len(ok),
                    "consoleTrouble": [r["consoleTrouble"] for r in records if r["consoleTrouble"]],
                    "summary": {
                        k: (s.as_dict() if s else None) for k, s in summaries(ok, OUR_KEYS).items()
                    },
                }
        finally:
            await bench.delete_vm(guest.name, timeout=120)
    return results


# -- QEMU alone ------------------------------------------------------------------------


def _peer_argv(
    guest: Guest, image: Path, qmp: Path, console: Path, tls_dir: Path, endpoint: str
) -> list[str]:
    argv = [
        qemu.QEMU,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-m",
        f"{guest.memory_bytes // MiB}M",
        "-kernel",
        str(image / "vmlinuz"),
        "-initrd",
        str(image / "initrd.img"),
        "-append",
        guest.cmdline,
        "-chardev",
        f"file,id=c0,path={console}",
        "-serial",
        "chardev:c0",
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
        "-object",
        f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint={endpoint},verify-peer=on",
    ]
    if endpoint == "server":
        argv += ["-incoming", "defer"]  # runs the guest as soon as it is loaded
    return argv


def _first_write(console: Path, stop: threading.Event, out: list[float]) -> None:
    """Record the wall-clock time ``console`` is first written to."""
    while not stop.is_set():
        if console.exists() and console.stat().st_size > 0:
            out.append(time.time())
            return
        time.sleep(0.001)


def _start_peer(
    guest: Guest, image: Path, root: Path, files: dict[str, Path], tls: tuple[Path, Path]
) -> list[subprocess.Popen[bytes]]:
    """The source QEMU (booting the guest) and the target (``-incoming defer``)."""
    root.mkdir(parents=True, exist_ok=True)
    for f in files.values():
        f.unlink(missing_ok=True)
    procs = []
    for side, tls_dir, endpoint in (("src", tls[1], "client"), ("dst", tls[0], "server")):
        argv = _peer_argv(
            guest, image, files[f"{side}.qmp"], files[f"{side}.log"], tls_dir, endpoint
        )
        procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL))
    return procs


async def peer_once(
    guest: Guest, mode: qemu.QemuMode, image: Path, root: Path, tls: tuple[Path, Path]
) -> Obj:
    """One QEMU-alone migration of a freshly booted guest."""
    files = {k: root / k for k in ("src.qmp", "dst.qmp", "src.log", "dst.log")}
    stop = threading.Event()
    first: list[float] = []
    watcher = threading.Thread(target=_first_write, args=(files["dst.log"], stop, first))
    procs = await asyncio.to_thread(_start_peer, guest, image, root, files, tls)
    try:
        src, dst = (
            await qemu.Qmp.connect(files["src.qmp"]),
            await qemu.Qmp.connect(files["dst.qmp"]),
        )
        deadline = time.monotonic() + BOOT_TIMEOUT
        while len(HB.findall(files["src.log"].read_text(errors="replace"))) < 20:
            if time.monotonic() > deadline:
                raise TimeoutError("the QEMU-alone guest printed no heartbeats")
            await asyncio.sleep(0.5)
        caps = [{"capability": "multifd", "state": bool(mode.multifd_channels)}]
        params: Obj = {"tls-creds": "tls0"}
        if mode.multifd_channels:
            params["multifd-channels"] = mode.multifd_channels
        for q in (src, dst):
            await q.execute("migrate-set-capabilities", capabilities=caps)
            await q.execute("migrate-set-parameters", **params)
        await src.execute(
            "migrate-set-parameters",
            **{"max-bandwidth": qemu.UNLIMITED_BANDWIDTH, "downtime-limit": 300},
        )
        uri = f"tcp:127.0.0.1:{qemu.free_port('127.0.0.1')}"
        await dst.execute("migrate-incoming", uri=uri)
        watcher.start()
        started = time.monotonic()
        await src.execute("migrate", uri=uri)
        end = started + TIMEOUT
        info = await qemu._poll_completed(src, end)
        await qemu._poll_completed(dst, end)
        seconds = time.monotonic() - started
        last_on_source = files["src.log"].stat().st_mtime_ns / 1e9
        watcher.join(timeout=10)
        await asyncio.sleep(1.0)
        text = files["dst.log"].read_text(errors="replace")
        return {
            "seconds": seconds,
            "throughput": guest.memory_bytes / seconds,
            "qemuTotalSeconds": info.get("total-time", 0) / 1000,
            "qemuDowntimeMilliseconds": info.get("downtime"),
            "guestDowntimeMilliseconds": (first[0] - last_on_source) * 1000 if first else None,
            "wireBytes": (info.get("ram") or {}).get("transferred"),
            "wireRate": ((info.get("ram") or {}).get("transferred") or 0)
            / max(info.get("total-time", 0) / 1000, 1e-3),
            "consoleTrouble": console_trouble(text) or (None if HB.search(text) else "no HB"),
        }
    finally:
        stop.set()
        for p in procs:
            p.kill()
            p.wait()


async def run_peers(
    guests: list[Guest], streams: int, runs: int, image: Path, log: Callable[[str], None]
) -> dict[str, Obj]:
    """QEMU alone, per (memory, load): the guests' repair variant's size and load."""
    results: dict[str, Obj] = {}
    with tempfile.TemporaryDirectory(prefix="vmferry-bench-qemu-tls-") as tmp:
        root = Path(tmp)
        tls = qemu.make_tls_dirs(root)
        for guest in guests:
            if guest.verify != "repair":
                continue
            for mode in peer_modes(streams):
                key = f"{guest.memory} {guest.load} {mode.name}"
                records = []
                for i in range(runs):
                    try:
                        rec = await peer_once(guest, mode, image, root / "run", tls)
                    except (RuntimeError, TimeoutError, OSError) as e:
                        rec = {"error": str(e)}
                    records.append(rec)
                    log(f"  QEMU alone {key} #{i + 1}: {rec}")
                ok = [r for r in records if "error" not in r]
                results[key] = {
                    "memoryBytes": guest.memory_bytes,
                    "load": guest.load,
                    "multifd": mode.multifd_channels,
                    "records": records,
                    "summary": {
                        k: (s.as_dict() if s else None) for k, s in summaries(ok, PEER_KEYS).items()
                    },
                }
    return results


# -- the scenario ----------------------------------------------------------------------


async def run_qemu_scenario(
    quick: bool,
    runs: int | None,
    streams: int,
    with_peers: bool,
    root: Path,
    log: Callable[[str], None],
    guests: list[Guest] | None = None,
) -> Obj:
    image = guest_image()
    if not qemu.available():
        return {"unavailable": f"{qemu.QEMU} is not installed"}
    if not (image / "vmlinuz").is_file() or not (image / "initrd.img").is_file():
        return {"unavailable": f"no guest image in {image} (make guest-image)"}
    guests = guests or plan(quick)
    n = runs or (2 if quick else 3)
    bench = LabBench(root)
    log(f"qemu: starting a 2-node lab in {root / 'lab'}")
    await asyncio.to_thread(bench.up)
    try:
        before = await bench.live_migration_config()
        ours = await run_vmferry(bench, guests, n, image, log)
        await bench.set_live_migration_config(
            {ConfigKey.PARALLEL_STREAMS: before.get(ConfigKey.PARALLEL_STREAMS)}
        )
    finally:
        await asyncio.to_thread(bench.down)
    result: Obj = {"runs": n, "ours": ours, "peers": {}}
    if with_peers:
        result["peers"] = await run_peers(guests, streams, n, image, log)
    result["ratios"] = ratios(result)
    return result


def ratios(result: Obj) -> dict[str, dict[str, float | None]]:
    """ours / QEMU alone, medians, for each of our combinations: one stream vs single,
    N streams vs multifd N, of the same memory size and load. ``throughput``: memory /
    the whole migration (ours: the source handler's, switchover included; QEMU: migrate
    -> the target completed); ``wireRate``: the stream's bytes / the time QEMU moved
    them (the tunnel against QEMU's TLS)."""
    out: dict[str, dict[str, float | None]] = {}
    for key, ours in result["ours"].items():
        peer = next(
            (
                p
                for p in result["peers"].values()
                if p["memoryBytes"] == ours["memoryBytes"]
                and p["load"] == ours["load"]
                and (p["multifd"] > 0) == (ours["streams"] > 1)
            ),
            None,
        )
        if peer is None:
            continue
        out[key] = {
            m: ratio(_median(ours, m), _median(peer, m)) for m in ("throughput", "wireRate")
        }
    return out


def _median(entry: Obj, key: str) -> float | None:
    d = entry["summary"].get(key)
    return median_of(Summary(**d)) if d else None


def table_lines(result: Obj) -> list[str]:
    lines = [
        "",
        f"== qemu: the TCG guest through vmferry vs QEMU's own TLS migration ({result.get('runs')} runs) ==",
    ]
    if "unavailable" in result:
        lines.append(f"  qemu unavailable: {result['unavailable']}")
        return lines
    w = 38
    for key, ours in result["ours"].items():
        s = {k: (Summary(**v) if v else None) for k, v in ours["summary"].items()}
        r = result["ratios"].get(key) or {}
        lines.append(
            f"  ours {key:<{w}} {fmt_summary(s.get('throughput'), 'MiB/s', MiB)}  "
            f"ours/QEMU {fmt_ratio(r.get('throughput'))}"
        )
        lines.append(
            f"       tunnel {fmt_summary(s.get('wireRate'), 'MiB/s', MiB)} "
            f"(stream bytes / QEMU's transfer time), ours/QEMU {fmt_ratio(r.get('wireRate'))}"
        )
        lines.append(
            f"       total {fmt_summary(s.get('migrationSeconds'), 's', digits=2)}, guest-seen "
            f"{fmt_summary(s.get('guestDowntimeMilliseconds'), 'ms')}, repaired "
            f"{fmt_summary(s.get('repairedPages'), 'pages', digits=0)}"
            + (f", {ours.get('failed')} FAILED" if ours["failed"] else "")
            + (f", console: {ours.get('consoleTrouble')[0]}" if ours["consoleTrouble"] else "")
        )
        steps = [
            f"{label} {v.median:.1f}"
            for label, k in (
                ("qemu", "downtime_qemu_stop_copy"),
                ("drain", "downtime_drain"),
                ("digest src", "step_source_digest"),
                ("digest dst", "step_target_digest"),
                ("compare", "step_compare"),
                ("repair", "step_repair"),
                ("verify", "downtime_verify"),
                ("resume", "downtime_resume"),
            )
            if (v := s.get(k)) is not None
        ]
        if steps:
            lines.append("       switchover (median ms): " + ", ".join(steps))
    for key, peer in result["peers"].items():
        s = {k: (Summary(**v) if v else None) for k, v in peer["summary"].items()}
        errors = [r["error"] for r in peer["records"] if "error" in r]
        lines.append(
            f"  QEMU alone {key:<{w - 6}} {fmt_summary(s.get('throughput'), 'MiB/s', MiB)}  "
            f"stream {fmt_summary(s.get('wireRate'), 'MiB/s', MiB)}, total {fmt_summary(s.get('seconds'), 's', digits=2)}, downtime "
            f"{fmt_summary(s.get('qemuDowntimeMilliseconds'), 'ms')}, guest-seen "
            f"{fmt_summary(s.get('guestDowntimeMilliseconds'), 'ms')}"
            + (f"; {len(errors)} errors: {errors[0][:80]}" if errors else "")
        )
    return lines
