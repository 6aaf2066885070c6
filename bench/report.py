"""The bench's printed report: the table of every scenario's medians, ratios to each peer
and to the gRPC ceiling, the switchover's parts and the scheduling deltas (``table``,
``compute_ratios``), from the results ``bench.run`` collected."""

from __future__ import annotations

import itertools
from typing import Any

from bench import digest_bench, netns_runs, qemu_runs, scale_runs, storage_runs, xcluster_runs
from bench.scenario_names import DIGEST, NETNS, QEMU_GUEST, SCALE, STORAGE, XCLUSTER
from bench.stats import (
    Summary,
    fmt_ratio,
    fmt_summary,
    load_warning,
    median_of,
    ratio,
    summarize,
)
from vmferry.migration_state import PROGRESS_PHASES, ConfigKey, MigrationPhase

Obj = dict[str, Any]
MiB = 1 << 20


def fmt(value: float | None, unit: str, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f} {unit}"


def _summary(d: Obj | None) -> Summary | None:
    return Summary(**d) if d else None


def ceiling(results: Obj) -> dict[str, float]:
    """{grpc variant: median throughput}."""
    out = {}
    for name, data in (results.get("grpc") or {}).items():
        s = _summary(data["summary"].get("throughput"))
        if s:
            out[name] = s.median
    return out


def compute_ratios(results: Obj) -> None:
    """Add ``ratios`` to every scenario: ours / each peer and / each gRPC ceiling."""
    ceil = ceiling(results)
    for sc in (results.get("scenarios") or {}).values():
        ours = median_of(_summary(sc["ours"]["summary"].get("throughput")))
        ratios: Obj = {}
        for name, peer in sc["peers"].items():
            ratios[name] = ratio(ours, median_of(_summary(peer["summary"].get("throughput"))))
        for name, value in ceil.items():
            ratios[name] = ratio(ours, value)
        sc["ratios"] = ratios


def table(results: Obj) -> str:
    lines: list[str] = []
    w = 28

    def row(label: str, value: str, extra: str = "") -> None:
        lines.append(f"  {label:<{w}} {value:<40} {extra}".rstrip())

    m = results["machine"]
    lines.append(
        f"vmferry bench  {m['started']}  cpus={m['cpus']} python {m['python']} grpcio {m['grpcio']}  "
        f"{m['qemu'] or 'no QEMU'}"
    )
    lines.append(
        f"load average at start {m['loadavgStart'][0]:.2f}, at end {m.get('loadavgEnd', [0])[0]:.2f}"
        "   values: median [min..max] over the runs; ratios: our throughput / theirs"
    )
    warning = load_warning(m["loadavgStart"][0])
    if warning:
        lines.append(warning)
    code = results.get("code") or {}
    if code.get("head"):
        modified = code.get("engineFilesModified") or []
        lines.append(
            f"code: HEAD {code['head'][:10]}"
            + (
                f" + {len(modified)} uncommitted engine files (the working tree ran)"
                if modified
                else ""
            )
        )
    cfg = results.get("liveMigrationConfig") or {}
    if cfg:
        lines.append(
            "liveMigrationConfig: "
            + ", ".join(
                f"{k}={cfg.get(k)}"
                for k in (
                    ConfigKey.PARALLEL_STREAMS,
                    ConfigKey.DOWNTIME_BUDGET_MS,
                    ConfigKey.BANDWIDTH_PER_MIGRATION,
                )
            )
        )
    grpc_res = results.get("grpc") or {}
    if grpc_res:
        lines.append("")
        lines.append("== bare gRPC mTLS streaming (the ceiling), 1 MiB messages ==")
        for name, data in grpc_res.items():
            summ = data["summary"]
            client, server = (_summary(summ.get(k)) for k in ("cpuPerGiBClient", "cpuPerGiBServer"))
            row(
                name,
                fmt_summary(_summary(summ["throughput"]), "MiB/s", MiB),
                f"CPU s/GiB client {fmt(median_of(client), '', 2).strip()}, "
                f"server {fmt(median_of(server), '', 2).strip()}",
            )
    for key, sc in (results.get("scenarios") or {}).items():
        ours = {k: _summary(v) for k, v in sc["ours"]["summary"].items()}
        lines.append("")
        extra = f", dirtying {sc['dirtyRate']}/s" if sc["dirtyRate"] != "0" else ""
        extra += f", {sc['touched']} touched" if sc["touched"] != "0" else ""
        extra += f", hot set {sc['hotSet']}" if sc.get("hotSet", "0") != "0" else ""
        lines.append(
            f"== {key}: {sc['title']}, {sc['memory']} {sc['content']}{extra} ({sc['runs']} runs) =="
        )
        failed = [r for r in sc["ours"]["records"] if r.get("phase") != MigrationPhase.SUCCEEDED]
        if failed:
            row("FAILED migrations", str(len(failed)), failed[0].get("failureReason") or "")
        row("ours: throughput", fmt_summary(ours["throughput"], "MiB/s", MiB))
        row(
            "ours: migration time",
            fmt_summary(ours["migrationSeconds"], "s", digits=2),
            "(source handler start -> succeeded)",
        )
        row(
            "ours: end to end",
            fmt_summary(ours["endToEndSeconds"], "s", digits=2),
            "(VMIM Pending -> Succeeded)",
        )
        mem = sc["memoryBytes"]
        wire = ours["wireBytes"]
        if wire:
            row(
                "ours: wire bytes",
                fmt_summary(wire, "MiB", MiB),
                f"({100 * wire.median / mem:.1f}% of memory)",
            )
        row("ours: rounds", fmt_summary(ours["rounds"], "", digits=0))
        gd = ours["guestDowntimeMilliseconds"]
        if gd:
            row(
                "ours: guest-seen downtime",
                fmt_summary(gd, "ms"),
                f"p50 {gd.median:.1f} ms, p99 {gd.p99:.1f} ms",
            )
        parts = [
            f"{p} {s.median:.1f}"
            for p in ("pause", "final_pass", "state_transfer", "verify", "decision", "resume")
            if (s := ours.get(f"downtime_{p}")) is not None
        ]
        if parts:
            row("ours: downtime parts (median)", ", ".join(parts) + " ms")
        if key == "sched" or ours.get("cliToFirstByteSeconds"):
            row(
                "sched: migrate -> first byte",
                fmt_summary(ours["cliToFirstByteSeconds"], "ms", 1e-3),
                "(CLI returned -> round 0 start; < 0: before the CLI exited)",
            )
            row(
                "sched: VMIM -> first byte",
                fmt_summary(ours.get("pendingToFirstByteSeconds"), "ms", 1e-3),
                "(VMIM phase Pending -> round 0 start)",
            )
            row(
                "sched: migrate -> handler",
                fmt_summary(ours["cliToHandlerStartSeconds"], "ms", 1e-3),
                "(CLI returned -> source 'starting')",
            )
            row(
                "sched: handler -> VMIM done",
                fmt_summary(ours["handlerToVmimSucceededSeconds"], "ms", 1e-3),
                "(source 'succeeded' log -> VMIM Succeeded)",
            )
            row(
                "sched: commit -> VMIM done",
                fmt_summary(ours["commitToVmimSucceededSeconds"], "ms", 1e-3),
                "(hand-off committed -> VMIM Succeeded)",
            )
        if key == "sched":
            phases = phase_deltas(sc["ours"]["records"])
            if phases:
                row(
                    "sched: VMIM phases (median)",
                    ", ".join(f"{p} +{v * 1000:.0f}" for p, v in phases.items()) + " ms",
                )
        cpu = [
            f"{r} {s.median:.2f}"
            for r in ("source", "target", "controller")
            if (s := ours.get(f"cpu_{r}")) is not None
        ]
        if cpu:
            workers = [
                f"{r} {s.median:.2f}"
                for r in ("source", "target")
                if (s := ours.get(f"cpuWorkers_{r}")) is not None and s.median
            ]
            row(
                "ours: CPU seconds (median)",
                ", ".join(cpu),
                f"(of which stream workers: {', '.join(workers)})" if workers else "",
            )
        per = [
            f"{r} {fmt_summary(s, '', digits=2).strip()}"
            for r in ("source", "target")
            if (s := ours.get(f"cpuPerGiB_{r}")) is not None
        ]
        if per:
            row(
                "ours: CPU s/GiB",
                ", ".join(per),
                "(CPU-seconds of the handler and its stream workers per GiB of guest memory)",
            )
        alloc = ours.get("targetRamAllocatedBytes")
        if alloc and sc["touched"] != "0":
            row(
                "ours: target RAM allocated",
                fmt_summary(alloc, "MiB", MiB),
                f"(guest touched {sc['touched']})",
            )
        for name, peer in sc["peers"].items():
            ps = {k: _summary(v) for k, v in peer["summary"].items()}
            extra_txt = f"ours {fmt_ratio(sc['ratios'].get(name))}"
            peer_wire = ps.get("wireBytes")
            if peer_wire and key == "text":
                extra_txt += f"; wire {100 * peer_wire.median / mem:.1f}% of memory"
            errors = [r["error"] for r in peer["records"] if "error" in r]
            if errors:
                extra_txt += f"; {len(errors)} errors: {errors[0][:80]}"
            row(name, fmt_summary(ps.get("throughput"), "MiB/s", MiB), extra_txt)
        for name, value in sc.get("ratios", {}).items():
            if name.startswith("grpc"):
                row(f"vs ceiling {name}", fmt_ratio(value))
    prof = results.get("profile")
    if prof:
        lines.append("")
        lines.append(
            f"== profile (py-spy, {prof.get('scenario')} scenario, one extra migration) =="
        )
        for role in ("source", "target"):
            p = prof.get(role) or {}
            if "error" in p:
                lines.append(f"  {role}: py-spy failed: {p['error']}")
                continue
            lines.append(
                f"  {role} handler: {p.get('samples', 0)} samples; threads: "
                + ", ".join(f"{t['thread']} {t['percent']}%" for t in p.get("threads", [])[:4])
            )
            lines.append("    self:")
            for e in p.get("self", [])[:12]:
                lines.append(f"      {e['percent']:5.1f}%  {e['function']}")
            lines.append("    event loop thread, self:")
            for e in p.get("eventLoopSelf", [])[:6]:
                lines.append(f"      {e['percent']:5.1f}%  {e['function']}")
            lines.append("    inclusive (without interpreter/event-loop/pool frames):")
            for e in p.get("inclusive", [])[:15]:
                lines.append(f"      {e['percent']:5.1f}%  {e['function']}")
    if results.get(XCLUSTER):
        lines += xcluster_runs.table_lines(results[XCLUSTER])
    if results.get(DIGEST):
        lines += digest_bench.table_lines(results[DIGEST])
    if results.get(STORAGE):
        lines += storage_runs.table_lines(results[STORAGE])
    if results.get(QEMU_GUEST):
        lines += qemu_runs.table_lines(results[QEMU_GUEST])
    if results.get(NETNS):
        lines += netns_runs.table_lines(results[NETNS])
    if results.get(SCALE):
        lines += ["", scale_runs.table(results[SCALE])]
    return "\n".join(lines)


def phase_deltas(records: list[Obj]) -> dict[str, float]:
    """Median time spent reaching each VMIM phase from the previous one."""
    order = [
        MigrationPhase.PENDING,
        MigrationPhase.SCHEDULING,
        *PROGRESS_PHASES,
        MigrationPhase.SUCCEEDED,
    ]
    out: dict[str, float] = {}
    for prev, cur in itertools.pairwise(order):
        values = [
            r["phases"][cur] - r["phases"][prev]
            for r in records
            if cur in r.get("phases", {}) and prev in r.get("phases", {})
        ]
        s = summarize(values)
        if s:
            out[cur] = s.median
    return out


# -- main -------------------------------------------------------------------------------------
