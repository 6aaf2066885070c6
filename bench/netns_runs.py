"""The ``netns`` bench scenario: a 1 GiB random memvm migration between two nodes with
their own network stacks, over a shaped link (``10gbit,0.2ms`` and ``1gbit,2ms``), and
QEMU's TLS migration of the same memory over the same link.

For each link shape a fresh netns lab (``vmferry lab up --netns``) with both the main
and the migration links shaped alike. The migration network is configured the way an
operator does it (reference 12.5.2): ``vmferry create -f`` a NetworkAttachmentDefinition
(macvlan on eth1, whereabouts in 198.51.100.0/24) and ``liveMigrationConfig.network``.
When this build does not know the NAD kind, or the nodes never come up on it, the
migrations run over the main network (eth0) and the results say ``"network": "main"``
and why. Per run the NIC byte counters of the source's namespace (rx+tx deltas) show
which NIC carried the migration. The QEMU peer runs its source in one node's namespace
and its target in the other's, dialling the target's address on that same network.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import time
from pathlib import Path
from typing import Any

from bench import qemu
from bench.lab_runs import LabBench, vm_manifest
from bench.stats import Summary, fmt_ratio, median_of, ratio, summaries
from vmferry.errors import ApiError
from vmferry.lab import netns
from vmferry.migration_network import MIGRATION_IP, NAD_API_VERSION, NAD_KIND, NAD_NAMESPACE
from vmferry.migration_state import ConfigKey, MigrationPhase
from vmferry.objects.quantity import parse_quantity

Obj = dict[str, Any]
MiB = 1 << 20
LINKS = ["10gbit,0.2ms", "1gbit,2ms"]
NAD_NAME = "migration"
NAD_CONFIG = {
    "cniVersion": "0.3.1",
    "name": NAD_NAME,
    "type": "macvlan",
    "master": netns.MIGRATION_NIC,
    "ipam": {"type": "whereabouts", "range": str(netns.MIGRATION_NETWORK)},
}
NETWORK_READY_TIMEOUT = 60.0
OUR_KEYS = ["throughput", "migrationSeconds", "wireBytes", "rounds", "downtimeMilliseconds"]
PEER_KEYS = ["throughput", "seconds", "wireBytes"]
QEMU_MODES = [
    qemu.QemuMode(tls=True, multifd_channels=0),
    qemu.QemuMode(tls=True, multifd_channels=2),
]


def _summary(d: Obj | None) -> Summary | None:
    return Summary(**d) if d else None


def nad_manifest() -> Obj:
    return {
        "apiVersion": NAD_API_VERSION,
        "kind": NAD_KIND,
        "metadata": {"name": NAD_NAME, "namespace": NAD_NAMESPACE},
        "spec": {"config": json.dumps(NAD_CONFIG)},
    }


def node_address(node: Obj, kind: str) -> str | None:
    for a in (node.get("status") or {}).get("addresses") or []:
        if a.get("type") == kind:
            address: str = a["address"]
            return address
    return None


async def configure_network(bench: LabBench, workdir: Path) -> Obj:
    """The dedicated migration network on eth1 if this build supports it: {"network":
    "migration" | "main", "note": why main, "addresses": {node: migration address}}."""
    manifest = workdir / "nad.json"
    manifest.write_text(json.dumps(nad_manifest()))
    try:
        await asyncio.to_thread(bench.cli, "create", "-f", str(manifest))
    except RuntimeError as e:
        why = str(e).split(": ", 1)[-1].split(" (known kinds")[0]
        return {"network": "main", "note": f"NetworkAttachmentDefinition refused: {why}"}
    await bench.set_live_migration_config({ConfigKey.NETWORK: NAD_NAME})
    names = bench.lab.node_names()
    deadline = time.monotonic() + NETWORK_READY_TIMEOUT
    addresses: dict[str, str] = {}
    async with bench.api() as api:
        while time.monotonic() < deadline:
            addresses = {}
            for name in names:
                with contextlib.suppress(ApiError):
                    address = node_address(await api.get("Node", None, name), MIGRATION_IP)
                    if address and ipaddress.IPv4Address(address) in netns.MIGRATION_NETWORK:
                        addresses[name] = address
            if len(addresses) == len(names):
                return {"network": NAD_NAME, "addresses": addresses}
            await asyncio.sleep(0.5)
    await bench.set_live_migration_config({ConfigKey.NETWORK: None})
    missing = sorted(set(names) - set(addresses))
    return {
        "network": "main",
        "note": f"nodes {', '.join(missing)} never reported a {MIGRATION_IP} in "
        f"{netns.MIGRATION_NETWORK} within {NETWORK_READY_TIMEOUT:.0f}s",
    }


async def _nic_bytes(ns: str) -> dict[str, int]:
    return await asyncio.to_thread(netns.nic_bytes, ns)


async def run_link(link: str, memory: str, runs: int, with_qemu: bool, root: Path, log: Any) -> Obj:
    workdir = root / f"netns-{link.replace(',', '-')}"
    workdir.mkdir(parents=True, exist_ok=True)
    bench = LabBench(workdir, netns_link=link)
    log(f"netns {link}: a netns lab with both links shaped {link}")
    await asyncio.to_thread(bench.up)
    out: Obj = {"link": link, "memory": memory, "runs": runs}
    try:
        if bench.lab.netns_of("node1") is None:
            out["skipped"] = "; ".join(bench.lab.warnings) or "no netns lab"
            return out
        lab_info = bench.lab.info()["netns"]
        out["delayApplied"] = lab_info.get("delayApplied", True)
        out["warnings"] = bench.lab.warnings
        net = await configure_network(bench, workdir)
        out.update(net)
        log(f"netns {link}: migrations over the {net['network']} network {net.get('note', '')}")
        name = "bench-netns"
        await bench.create_vm(vm_manifest(name, memory, "random"))
        ours: list[Obj] = []
        peers: dict[str, list[Obj]] = {m.name: [] for m in QEMU_MODES} if with_qemu else {}
        try:
            await bench.wait_guest_booted(name)
            await asyncio.sleep(1.0)
            for i in range(runs):
                async with bench.api() as api:
                    source = (await api.get("VirtualMachineInstance", "default", name))["status"][
                        "nodeName"
                    ]
                source_ns = bench.lab.netns_of(source)
                assert source_ns is not None
                before = await _nic_bytes(source_ns)
                rec = await bench.migrate(name)
                after = await _nic_bytes(source_ns)
                rec["nicBytes"] = {nic: after[nic] - before.get(nic, 0) for nic in after}
                rec["busiestNic"] = max(rec["nicBytes"], key=lambda n: rec["nicBytes"][n])
                ours.append(rec)
                log(
                    f"  ours #{i + 1}: {rec.get('phase')} "
                    f"{(rec.get('throughput') or 0) / MiB:.0f} MiB/s, "
                    f"{rec['busiestNic']} carried {rec['nicBytes'][rec['busiestNic']] / MiB:.0f} MiB"
                    + (
                        f" FAILED: {rec.get('failureReason')}"
                        if rec.get("phase") != MigrationPhase.SUCCEEDED
                        else ""
                    )
                )
            if with_qemu:
                peers = await run_qemu(bench, net, memory, runs, log)
        finally:
            with contextlib.suppress(Exception):
                await bench.delete_vm(name)
        out["ours"] = {
            "records": ours,
            "summary": {
                k: (s.as_dict() if s else None) for k, s in summaries(ours, OUR_KEYS).items()
            },
        }
        out["peers"] = {
            n: {
                "records": recs,
                "summary": {
                    k: (s.as_dict() if s else None)
                    for k, s in summaries([r for r in recs if "error" not in r], PEER_KEYS).items()
                },
            }
            for n, recs in peers.items()
        }
        ours_median = median_of(_summary(out["ours"]["summary"].get("throughput")))
        out["ratios"] = {
            n: ratio(ours_median, median_of(_summary(peer["summary"].get("throughput"))))
            for n, peer in out["peers"].items()
        }
        return out
    finally:
        log(f"netns {link}: lab down")
        await asyncio.to_thread(bench.down)


async def run_qemu(
    bench: LabBench, net: Obj, memory: str, runs: int, log: Any
) -> dict[str, list[Obj]]:
    """QEMU from node1's namespace to node2's, over the network our migrations took."""
    source, target = "node1", "node2"
    if net["network"] == NAD_NAME:
        host = net["addresses"][target]
    else:
        host = bench.lab.info()["netns"]["addresses"][target]
    placement = qemu.Placement(
        source_prefix=tuple(bench.lab.netns_exec(source, [])),
        target_prefix=tuple(bench.lab.netns_exec(target, [])),
        target_host=host,
    )
    peer = qemu.QemuPeer(parse_quantity(memory), "random", placement=placement)
    peers: dict[str, list[Obj]] = {m.name: [] for m in QEMU_MODES}
    try:
        await peer.prepare()
        for i in range(runs):
            for mode in QEMU_MODES:
                source_ns = bench.lab.netns_of(source)
                assert source_ns is not None
                before = await _nic_bytes(source_ns)
                r = await peer.migrate(mode)
                after = await _nic_bytes(source_ns)
                r["nicBytes"] = {nic: after[nic] - before.get(nic, 0) for nic in after}
                peers[mode.name].append(r)
                log(
                    f"  {mode.name} #{i + 1}: "
                    + (
                        f"error {r['error']}"
                        if "error" in r
                        else f"{r['seconds']:.2f}s {r['throughput'] / MiB:.0f} MiB/s to {host}"
                    )
                )
    finally:
        peer.close()
    return peers


async def run_netns(quick: bool, runs: int | None, with_qemu: bool, root: Path, log: Any) -> Obj:
    """The whole scenario: one result per link shape."""
    memory = "256Mi" if quick else "1Gi"
    n = runs if runs is not None else (1 if quick else 3)
    reason = netns.unsupported_reason()
    if reason is not None:
        log(f"netns: skipped ({reason})")
        return {"skipped": reason}
    return {
        "title": f"{memory} random memory over shaped links between node namespaces",
        "links": {link: await run_link(link, memory, n, with_qemu, root, log) for link in LINKS},
    }


def table_lines(result: Obj) -> list[str]:
    lines = ["", f"== netns: {result.get('title', 'links between node namespaces')} =="]
    if "skipped" in result:
        return [*lines, f"  skipped: {result['skipped']}"]
    for link, res in result["links"].items():
        if "skipped" in res:
            lines.append(f"  {link}: skipped: {res['skipped']}")
            continue
        delay = "" if res.get("delayApplied", True) else " (delay NOT applied: no netem)"
        lines.append(
            f"  link {link}{delay}, network {res['network']}"
            + (f" ({res['note']})" if res.get("note") else "")
        )

        def fmt(summary: Obj | None) -> str:
            if not summary:
                return "n/a"
            return (
                f"{summary['median'] / MiB:.0f} MiB/s "
                f"[{summary['min'] / MiB:.0f}..{summary['max'] / MiB:.0f}]"
            )

        lines.append(f"    {'ours':<26} {fmt(res['ours']['summary'].get('throughput'))}")
        for name, peer in res.get("peers", {}).items():
            r = (res.get("ratios") or {}).get(name)
            lines.append(
                f"    {name:<26} {fmt(peer['summary'].get('throughput'))}"
                f"   ours/theirs {fmt_ratio(r)}"
            )
    return lines
