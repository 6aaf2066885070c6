"""The netns bench scenario's pieces that need no lab: its NAD is valid under the
contract, and its report prints what the JSON holds."""

from __future__ import annotations

import pytest

from bench import netns_runs
from vmferry.lab import netns
from vmferry.migration_network import CniType, IpamType, parse_nad_config


@pytest.mark.timeout(10)
def test_the_bench_nad_is_valid_on_the_lab_networks() -> None:
    topo = netns.Topology("vmfabcdef", ("node1", "node2"))
    nad = netns_runs.nad_manifest()
    assert nad["metadata"]["namespace"] == "openshift-cnv"
    cfg = parse_nad_config(nad["spec"]["config"], [topo.main_address(n) for n in topo.nodes])
    assert cfg.master == netns.MIGRATION_NIC
    assert cfg.cni_type == CniType.MACVLAN and cfg.ipam_type == IpamType.WHEREABOUTS
    assert cfg.network == netns.MIGRATION_NETWORK


@pytest.mark.timeout(10)
def test_table_lines() -> None:
    summary = {"n": 1, "median": 100 << 20, "min": 100 << 20, "max": 100 << 20, "p99": 0, "mean": 0}
    result = {
        "title": "1Gi random",
        "links": {
            "1gbit,2ms": {
                "delayApplied": False,
                "network": "main",
                "note": "NetworkAttachmentDefinition refused: no kind",
                "ours": {"summary": {"throughput": summary}},
                "peers": {"qemu-tls-single": {"summary": {"throughput": summary}}},
                "ratios": {"qemu-tls-single": 1.0},
            },
            "10gbit,0.2ms": {"skipped": "no netns"},
        },
    }
    text = "\n".join(netns_runs.table_lines(result))
    assert "link 1gbit,2ms (delay NOT applied: no netem), network main" in text
    assert "ours                       100 MiB/s [100..100]" in text
    assert "ours/theirs 1.00x" in text
    assert "10gbit,0.2ms: skipped: no netns" in text
    assert "skipped: root" in "\n".join(netns_runs.table_lines({"skipped": "root"}))
