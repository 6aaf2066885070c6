"""``make bench``: the transfer engine measured side by side with QEMU and bare gRPC.

Scenarios (issue 7), each run several times; every run of ours is followed by one run of
each QEMU peer, so both see the same machine noise:

  random  random memory, idle guest, 1 GiB: throughput (memory bytes / migration time)
  zero    zero-heavy guest, 4 GiB with 256 MiB touched: total migration time
  text    compressible (text) memory, 1 GiB: throughput and bytes on the wire
  busy    busy guest, 1 GiB dirtying 50 MiB/s: time, rounds, guest-seen downtime p50/p99
  sched   scheduling overhead: `vmferry migrate` returning -> first byte on the wire, and
          Succeeded on the handler -> Succeeded on the VMIM
  grpc    the bare gRPC mTLS ceiling (1 stream, N streams on one connection, N connections)
  xcluster the same busy VM migrated inside cluster1 and to cluster2 (a two-cluster lab):
          throughput and guest-seen downtime of both, and whether the cross-cluster
          figures are within 10% (bench/xcluster_runs.py; "cross-cluster unavailable:
          <reason>" when it cannot run)
  digest  the page digests (no lab): GiB/s of the former and current implementations on
          1 thread and all cores, and the QEMU switchover's verify cost, for 512 MiB to 4 GiB
          of RAM (bench/digest_bench.py)
  scale   (only when named: --scenario scale) one controller on SQLite and on etcd with a
          simulated fleet (fake handlers: register, heartbeat, VMIs made Running,
          migrations answered without moving memory) at 100 nodes / 300 VMIs
          (--scale-size medium: 100 / 1,000, large: 1,000 / 10,000; --quick: 10 / 50):
          time to place and run every VMI, list time, watch fan-out to 1,000 watchers,
          scheduling throughput and time until the migrations end, a 100-node drain, the
          hand-off write's latency, controller RSS (bench/scale_runs.py)
  storage a QEMU guest's 1 GiB disk moved to a local claim of the other node while it
          writes 8 MiB/s (storage live migration), next to QEMU's own blockdev-mirror +
          migration without vmferry (bench/storage_runs.py)
  qemu    the TCG test guest (512 MiB and 2 GiB, idle and dirtying) through vmferry's
          QEMU driver (1 and 2 streams; verify repair, detect, off) next to QEMU's own TLS
          migration of the same guest (single and multifd): throughput, total time,
          guest-seen downtime, pages repaired, the switchover's steps; --quick: 512 MiB
          idle only (bench/qemu_runs.py; skipped with --no-qemu)
  netns   (--netns; root) 1 GiB random memory between two nodes with their own network
          stacks, over a 10gbit,0.2ms and a 1gbit,2ms link, the QEMU peer over the same
          link (bench/netns_runs.py)

Ours: memory bytes / migrationSeconds, where migrationSeconds is the source handler's span
from its "starting" log line to its "succeeded" line (rounds, switchover with digest
verification, commit, resume, final status write). QEMU: from the ``migrate`` command to
the target reporting ``completed``. Ratios are throughput ratios: ours / theirs, > 1 means
ours is faster.

  python -m bench.run [--quick] [--scenario NAME ...] [--output FILE] [--no-qemu]
                      [--no-profile] [--profile-scenario NAME] [--runs N] [--netns]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import (
    digest_bench,
    grpc_baseline,
    netns_runs,
    qemu,
    qemu_runs,
    scale_runs,
    storage_runs,
    xcluster_runs,
)
from bench.lab_runs import MISSING_FIELDS, LabBench, vm_manifest
from bench.profile import Recorder, top_entries
from bench.report import compute_ratios, fmt, table
from bench.scenario_names import (
    DIGEST,
    NETNS,
    QEMU_GUEST,
    SCALE,
    SCENARIO_NAMES,
    STORAGE,
    XCLUSTER,
)
from bench.stats import (
    load_warning,
    summaries,
)
from vmferry.migration_state import ConfigKey, MigrationPhase
from vmferry.objects.quantity import parse_quantity

Obj = dict[str, Any]
MiB = 1 << 20
DEFAULT_OUTPUT = Path(__file__).parent / "results" / "latest.json"
REPO = Path(__file__).resolve().parent.parent

OUR_KEYS = [
    "throughput",
    "migrationSeconds",
    "endToEndSeconds",
    "wireBytes",
    "rounds",
    "downtimeMilliseconds",
    "guestDowntimeMilliseconds",
    "downtime_pause",
    "downtime_final_pass",
    "downtime_state_transfer",
    "downtime_verify",
    "downtime_decision",
    "downtime_resume",
    "cliToFirstByteSeconds",
    "pendingToFirstByteSeconds",
    "cliToHandlerStartSeconds",
    "handlerStartToFirstByteSeconds",
    "handlerToVmimSucceededSeconds",
    "commitToVmimSucceededSeconds",
    "cpu_source",
    "cpu_target",
    "cpu_controller",
    "cpuWorkers_source",
    "cpuWorkers_target",
    "cpuPerGiB_source",
    "cpuPerGiB_target",
    "targetRamAllocatedBytes",
]
GRPC_KEYS = ["throughput", "cpuPerGiBClient", "cpuPerGiBServer"]
PEER_KEYS = ["throughput", "seconds", "wireBytes", "qemuDowntimeMilliseconds"]


@dataclass
class Scenario:
    name: str
    title: str
    memory: str
    content: str
    runs: int
    dirty_rate: str = "0"
    touched: str = "0"
    hot_set: str = "0"  # the region the workload writes; "0" = all of RAM
    qemu_modes: list[qemu.QemuMode] = field(default_factory=list)

    @property
    def memory_bytes(self) -> int:
        return parse_quantity(self.memory)


def standard_modes(streams: int) -> list[qemu.QemuMode]:
    return [
        qemu.QemuMode(tls=False, multifd_channels=0),
        qemu.QemuMode(tls=True, multifd_channels=0),
        qemu.QemuMode(tls=False, multifd_channels=streams),
        qemu.QemuMode(tls=True, multifd_channels=streams),
    ]


def scenarios(quick: bool, streams: int, runs: int | None) -> dict[str, Scenario]:
    modes = standard_modes(streams)
    text_modes = [*modes, qemu.QemuMode(tls=True, multifd_channels=streams, compression="zstd")]
    if quick:
        out = [
            Scenario("random", "random memory, idle guest", "256Mi", "random", 2, qemu_modes=modes),
            Scenario(
                "zero", "zero-heavy guest", "1Gi", "random", 2, touched="64Mi", qemu_modes=modes
            ),
            Scenario(
                "text", "compressible (text) memory", "256Mi", "text", 2, qemu_modes=text_modes
            ),
            Scenario("busy", "busy guest", "256Mi", "random", 4, dirty_rate="50Mi"),
            Scenario("sched", "scheduling overhead, idle 64 MiB guest", "64Mi", "random", 3),
        ]
    else:
        out = [
            Scenario("random", "random memory, idle guest", "1Gi", "random", 5, qemu_modes=modes),
            Scenario(
                "zero", "zero-heavy guest", "4Gi", "random", 3, touched="256Mi", qemu_modes=modes
            ),
            Scenario("text", "compressible (text) memory", "1Gi", "text", 3, qemu_modes=text_modes),
            Scenario("busy", "busy guest", "1Gi", "random", 10, dirty_rate="50Mi"),
            Scenario("sched", "scheduling overhead, idle 128 MiB guest", "128Mi", "random", 10),
        ]
    if runs is not None:
        for s in out:
            s.runs = max(runs, 10) if s.name == "busy" and not quick else runs
    return {s.name: s for s in out}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def source_info() -> Obj:
    """Which code was measured: HEAD and whether the engine's files differ from it (the
    lab runs the working tree)."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], capture_output=True, text=True, timeout=10, cwd=REPO
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip()

    return {
        "head": git("rev-parse", "HEAD"),
        "engineFilesModified": git(
            "status", "--porcelain", "--", "handler", "proto", "vmferry/rpc"
        ).splitlines(),
    }


def machine_info() -> Obj:
    try:
        shm = os.statvfs("/dev/shm")
        shm_free = shm.f_bavail * shm.f_frsize
    except OSError:
        shm_free = 0
    import grpc

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "qemu": qemu.version(),
        "loadavgStart": os.getloadavg(),
        "devShmFreeBytes": shm_free,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def summary_dict(records: list[Obj], keys: list[str]) -> dict[str, Obj | None]:
    return {k: (s.as_dict() if s else None) for k, s in summaries(records, keys).items()}


# -- running ------------------------------------------------------------------------------


async def run_grpc(quick: bool, streams: int, runs: int | None, workdir: Path) -> Obj:
    total = (256 if quick else 1024) * MiB
    n = runs if runs is not None else (1 if quick else 3)
    variants = [(1, 1), (streams, 1), (streams, streams)]
    log(f"grpc baseline: {total // MiB} MiB x {n} runs, variants {variants}")
    results: dict[str, list[Obj]] = await asyncio.to_thread(
        grpc_baseline.run_baseline,
        workdir,
        total_bytes=total,
        message_bytes=MiB,
        variants=variants,
        runs=n,
    )
    return {
        name: {"records": recs, "summary": summary_dict(recs, GRPC_KEYS)}
        for name, recs in results.items()
    }


async def run_scenario(
    bench: LabBench, sc: Scenario, *, with_qemu: bool, profile_dir: Path | None
) -> Obj:
    name = f"bench-{sc.name}"
    manifest = vm_manifest(
        name,
        sc.memory,
        sc.content,
        dirty_rate=sc.dirty_rate,
        hot_set=sc.hot_set,
        touched=sc.touched,
    )
    log(f"{sc.name}: {sc.title}, {sc.memory}, {sc.runs} runs")
    peer: qemu.QemuPeer | None = None
    ours: list[Obj] = []
    peers: dict[str, list[Obj]] = {m.name: [] for m in sc.qemu_modes} if with_qemu else {}
    profiled: Obj | None = None
    await bench.create_vm(manifest)
    try:
        await bench.wait_guest_booted(name)
        if with_qemu and sc.qemu_modes:
            peer = qemu.QemuPeer(sc.memory_bytes, sc.content, parse_quantity(sc.touched))
            await peer.prepare()
        await asyncio.sleep(1.0)
        for i in range(sc.runs):
            rec = await bench.migrate(name)
            ours.append(rec)
            log(
                f"  ours #{i + 1}: {rec.get('phase')} {fmt(rec.get('migrationSeconds'), 's')} "
                f"{fmt((rec.get('throughput') or 0) / MiB, 'MiB/s')} rounds={rec.get('rounds')} "
                f"guest downtime {fmt(rec.get('guestDowntimeMilliseconds'), 'ms')} "
                f"CPU/GiB source {fmt(rec.get('cpuPerGiB_source'), 's', 2)} "
                f"target {fmt(rec.get('cpuPerGiB_target'), 's', 2)} "
                f"(load {os.getloadavg()[0]:.2f})"
                + (
                    f" FAILED: {rec.get('failureReason')}"
                    if rec.get("phase") != MigrationPhase.SUCCEEDED
                    else ""
                )
            )
            if peer is not None:
                for mode in sc.qemu_modes:
                    r = await peer.migrate(mode)
                    peers[mode.name].append(r)
                    log(
                        f"  {mode.name} #{i + 1}: "
                        + (
                            f"error {r['error']}"
                            if "error" in r
                            else f"{fmt(r['seconds'], 's')} {fmt(r['throughput'] / MiB, 'MiB/s')}"
                        )
                    )
        if profile_dir is not None:
            profiled = await profile_run(bench, name, profile_dir)
    finally:
        if peer is not None:
            peer.close()
        with contextlib.suppress(Exception):
            await bench.delete_vm(name)
    return {
        "title": sc.title,
        "memory": sc.memory,
        "memoryBytes": sc.memory_bytes,
        "content": sc.content,
        "dirtyRate": sc.dirty_rate,
        "touched": sc.touched,
        "hotSet": sc.hot_set,
        "runs": sc.runs,
        "ours": {"records": ours, "summary": summary_dict(ours, OUR_KEYS)},
        "peers": {
            n: {
                "records": recs,
                "summary": summary_dict([r for r in recs if "error" not in r], PEER_KEYS),
            }
            for n, recs in peers.items()
        },
        "profile": profiled,
    }


async def profile_run(bench: LabBench, name: str, profile_dir: Path) -> Obj:
    """One extra (untimed) migration with py-spy on the source and target handlers."""
    async with bench.api() as api:
        vmi = await api.get("VirtualMachineInstance", "default", name)
    source = vmi["status"]["nodeName"]
    target = next(n for n in bench.lab.node_names() if n != source)
    recorders = {}
    for role, node in (("source", source), ("target", target)):
        pid = bench.lab.pid(node)
        if pid is None:
            continue
        rec = Recorder(pid, profile_dir / f"{role}.collapsed")
        rec.start()
        recorders[role] = rec
    log(f"  profiling one more migration with py-spy ({source} -> {target})")
    await asyncio.sleep(1.0)  # py-spy attaches
    try:
        record = await bench.migrate(name, settle=0.2)
    finally:
        outputs = {role: r.stop() for role, r in recorders.items()}
    result: Obj = {
        "migration": {k: record.get(k) for k in ("migrationSeconds", "throughput", "phase")}
    }
    for role, ok in outputs.items():
        path = recorders[role].output
        if ok:
            result[role] = top_entries(path.read_text(errors="replace"))
            result[role]["file"] = str(path)
        else:
            err = path.with_suffix(".log")
            result[role] = {
                "error": err.read_text(errors="replace")[-500:] if err.exists() else "no output"
            }
    return result


# -- the report -----------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> Obj:
    selected = args.scenario or ([] if args.netns else SCENARIO_NAMES)
    if args.netns and NETNS not in selected:
        selected = [*selected, NETNS]
    machine = machine_info()
    log(f"load average at start {machine['loadavgStart'][0]:.2f}")
    warning = load_warning(machine["loadavgStart"][0])
    if warning:
        log(warning)
    results: Obj = {
        "machine": machine,
        "code": source_info(),
        "missingFields": MISSING_FIELDS,
        "scenarios": {},
    }
    root = Path(tempfile.mkdtemp(prefix="vmferry-bench-"))
    results["workdir"] = str(root)
    streams = args.streams
    if "grpc" in selected:
        results["grpc"] = await run_grpc(args.quick, streams, args.runs, root / "grpc")
    if DIGEST in selected:
        results[DIGEST] = await asyncio.to_thread(
            digest_bench.run_digest, args.quick, args.runs, log
        )
    lab_scenarios = [
        s
        for s in selected
        if s not in ("grpc", NETNS, XCLUSTER, DIGEST, SCALE, STORAGE, QEMU_GUEST)
    ]
    if lab_scenarios:
        bench = LabBench(root, ha=args.ha, stream_workers=args.stream_workers)
        what = "3 controller replicas on etcd" if args.ha else "a controller"
        log(f"lab: starting {what} and 2 handlers in {root / 'lab'}")
        await asyncio.to_thread(bench.up)
        try:
            if args.streams_config:
                await bench.set_live_migration_config({ConfigKey.PARALLEL_STREAMS: streams})
            results["liveMigrationConfig"] = await bench.live_migration_config()
            with_qemu = not args.no_qemu and qemu.available()
            if not with_qemu and not args.no_qemu:
                log("qemu-system-x86_64 not found: QEMU peers skipped (make bench installs it)")
            all_sc = scenarios(args.quick, streams, args.runs)
            for key in lab_scenarios:
                profile_dir = None
                if key == args.profile_scenario and not args.no_profile:
                    profile_dir = root / "profile"
                    profile_dir.mkdir(exist_ok=True)
                res = await run_scenario(
                    bench, all_sc[key], with_qemu=with_qemu, profile_dir=profile_dir
                )
                prof = res.pop("profile", None)
                if prof is not None:
                    results["profile"] = {"scenario": key, **prof}
                results["scenarios"][key] = res
        finally:
            log("lab: stopping")
            await asyncio.to_thread(bench.down)
    if XCLUSTER in selected:
        results[XCLUSTER] = await xcluster_runs.run_xcluster(
            args.quick, args.runs, root / XCLUSTER, log
        )
    if SCALE in selected:
        sizes = ["tiny"] if args.quick else args.scale_size
        results[SCALE] = await scale_runs.run_scale(sizes, log, root / SCALE)
    if STORAGE in selected:
        results[STORAGE] = await storage_runs.run_storage(
            args.quick, args.runs, not args.no_qemu and qemu.available(), root / STORAGE, log
        )
    if QEMU_GUEST in selected and not args.no_qemu:
        results[QEMU_GUEST] = await qemu_runs.run_qemu_scenario(
            args.quick, args.runs, streams, True, root / QEMU_GUEST, log
        )
    if NETNS in selected:
        with_qemu = not args.no_qemu and qemu.available()
        results["netns"] = await netns_runs.run_netns(
            args.quick, args.runs, with_qemu, root / NETNS, log
        )
    results["machine"]["loadavgEnd"] = os.getloadavg()
    log(f"load average at end {results['machine']['loadavgEnd'][0]:.2f}")
    compute_ratios(results)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer runs, smaller guests")
    p.add_argument(
        "--scenario",
        action="append",
        choices=[*SCENARIO_NAMES, NETNS, SCALE],
        help="run only this scenario (repeatable); default: all but netns and scale",
    )
    p.add_argument(
        "--netns",
        action="store_true",
        help="the netns scenario (alone unless --scenario adds others): shaped links between "
        "node namespaces, needs root",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"JSON results (default {DEFAULT_OUTPUT}; '-' for stdout)",
    )
    p.add_argument(
        "--runs", type=int, help="runs per scenario (busy keeps at least 10 unless --quick)"
    )
    p.add_argument(
        "--streams",
        type=int,
        default=2,
        help="N for the gRPC N-stream ceiling and QEMU multifd channels (default 2)",
    )
    p.add_argument(
        "--stream-workers",
        type=int,
        help="each lab handler's stream worker processes (channels 1.. of a migration on "
        "their own cores; 0: every stream in the handler; default: the handler's, auto)",
    )
    p.add_argument(
        "--streams-config",
        action="store_true",
        help="also set liveMigrationConfig.parallelStreams to --streams",
    )
    p.add_argument(
        "--scale-size",
        action="append",
        choices=[k for k in scale_runs.SIZES if k != "tiny"],
        help="the scale scenario's sizes (repeatable; default small: 100 nodes / 300 VMIs; "
        "medium: 100 / 1,000; large: 1,000 / 10,000)",
    )
    p.add_argument(
        "--ha",
        action="store_true",
        help="run the lab scenarios with the controllers replicated on etcd (lab up --ha)",
    )
    p.add_argument(
        "--no-qemu", action="store_true", help="skip the QEMU peers and the qemu scenario"
    )
    p.add_argument(
        "--no-profile", action="store_true", help="skip the py-spy profile of the random scenario"
    )
    p.add_argument(
        "--profile-scenario",
        default="random",
        choices=["random", "zero", "text", "busy", "sched"],
        help="the lab scenario profiled with py-spy after its runs (default random)",
    )
    args = p.parse_args(argv)
    args.scale_size = args.scale_size or ["small"]
    results = asyncio.run(main_async(args))
    text = json.dumps(results, indent=2, default=str)
    if str(args.output) == "-":
        print(text)
        print(table(results), file=sys.stderr)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
        print(table(results))
        print(f"\nJSON: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
