"""Prometheus metrics of a real lab: each daemon is scraped during and after a real
migration, and the values follow the migration (names, types and labels as KubeVirt's)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.lab import LabHarness, migration_name, vm_manifest

HANDLER_FAMILIES = {
    "kubevirt_vmi_migration_data_processed_bytes": "gauge",
    "kubevirt_vmi_migration_data_remaining_bytes": "gauge",
    "kubevirt_vmi_migration_data_bytes": "counter",  # sample: …_data_bytes_total
    "kubevirt_vmi_migration_data_total_bytes": "gauge",  # the pre-rename name
    "kubevirt_vmi_migration_dirty_memory_rate_bytes": "gauge",
    "kubevirt_vmi_migration_memory_transfer_rate_bytes": "gauge",
    "kubevirt_vmi_migration_last_downtime_seconds": "gauge",
    "kubevirt_vmi_migration_downtime_seconds": "histogram",
    "vmferry_migration_downtime_seconds": "histogram",
    "vmferry_migration_downtime_part_seconds": "histogram",
    "vmferry_migration_rounds": "gauge",
    "vmferry_migration_wire_bytes": "gauge",
    "vmferry_migration_postcopy_stall_seconds": "gauge",
    "vmferry_handler_ready_status": "gauge",
    "process_cpu_seconds": "counter",  # prometheus_client's process collector
}
CONTROLLER_FAMILIES = {
    "kubevirt_vmi_migrations_in_pending_phase": "gauge",
    "kubevirt_vmi_migrations_in_scheduling_phase": "gauge",
    "kubevirt_vmi_migrations_in_running_phase": "gauge",
    "kubevirt_vmi_migrations_in_unset_phase": "gauge",
    "kubevirt_vmi_migration_succeeded": "gauge",
    "kubevirt_vmi_migration_failed": "gauge",
    "kubevirt_vmi_migration_phase_transition_time_from_creation_seconds": "histogram",
    "kubevirt_vmi_migration_start_time_seconds": "gauge",
    "kubevirt_vmi_migration_end_time_seconds": "gauge",
    "kubevirt_vmi_non_evictable": "gauge",
    "kubevirt_vmi_info": "gauge",
    "kubevirt_virt_controller_leading_status": "gauge",
    "kubevirt_virt_controller_ready_status": "gauge",
    "python_gc_objects_collected": "counter",
}


def families(lab: LabHarness, component: str) -> dict[str, str]:
    content_type, text = lab.fetch_metrics(component)
    assert content_type.startswith("text/plain; version=0.0.4")
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def value(scrape: dict, metric: str, /, **labels: str) -> float | None:
    """The value of the first sample ``metric`` whose labels include ``labels``."""
    want = tuple(sorted(labels.items()))
    for (sample, sample_labels), v in scrape.items():
        if sample == metric and all(item in sample_labels for item in want):
            return v
    return None


@pytest.mark.timeout(90)
def test_metrics_follow_a_live_migration(lab: LabHarness) -> None:
    lab.apply(vm_manifest("metered", memory="128Mi", dirty_rate="4Mi", hot_set="16Mi"))
    vmi = lab.wait_vmi_running("metered")
    source = vmi["status"]["nodeName"]
    vm = {"namespace": "default", "name": "metered", "node": source}

    for name, mtype in CONTROLLER_FAMILIES.items():
        assert families(lab, "controller").get(name) == mtype, name
    idle = lab.scrape("controller")
    assert value(idle, "kubevirt_vmi_migrations_in_running_phase") == 0
    assert value(lab.scrape(source), "kubevirt_vmi_migration_data_processed_bytes", **vm) is None

    lab.set_live_migration_config(bandwidthPerMigration="32Mi")  # ~4 s: time to look
    try:
        out = lab.cli("migrate", "metered")
        vmim = migration_name(out.stdout)

        # During: the controller counts it as running, the source reports moving bytes.
        lab.wait_for(
            "the controller to count a running migration",
            lambda: value(lab.scrape("controller"), "kubevirt_vmi_migrations_in_running_phase"),
            timeout=20,
            interval=0.1,
        )
        first = lab.wait_for(
            "the source to report progress",
            lambda: (
                (s := lab.scrape(source))
                and (value(s, "kubevirt_vmi_migration_data_processed_bytes", **vm) or 0) > 0
                and s
            ),
            timeout=20,
            interval=0.1,
        )
        processed_1 = value(first, "kubevirt_vmi_migration_data_processed_bytes", **vm)
        remaining_1 = value(first, "kubevirt_vmi_migration_data_remaining_bytes", **vm)
        total = value(first, "kubevirt_vmi_migration_data_bytes_total", **vm)
        assert total == 128 << 20
        assert value(first, "kubevirt_vmi_migration_data_total_bytes", **vm) == total
        assert remaining_1 and remaining_1 > 0
        later = lab.wait_for(
            "the processed bytes to grow",
            lambda: (
                (s := lab.scrape(source))
                and (value(s, "kubevirt_vmi_migration_data_processed_bytes", **vm) or 0)
                > (processed_1 or 0)
                and s
            ),
            timeout=20,
            interval=0.2,
        )
        assert (value(later, "vmferry_migration_wire_bytes", **vm) or 0) > 0
        final = lab.wait_vmim_final(vmim, timeout=60)
    finally:
        lab.set_live_migration_config(bandwidthPerMigration="0")
    assert final["status"]["phase"] == "Succeeded"
    target = final["status"]["migrationState"]["targetNode"]

    # After, on the source: the final figures stay, and the downtime was observed once.
    after = lab.scrape(source)
    assert value(after, "kubevirt_vmi_migration_data_remaining_bytes", **vm) == 0
    assert (value(after, "kubevirt_vmi_migration_data_processed_bytes", **vm) or 0) >= total
    assert (value(after, "kubevirt_vmi_migration_memory_transfer_rate_bytes", **vm) or 0) > 0
    assert (value(after, "vmferry_migration_rounds", **vm) or 0) >= 1
    assert value(after, "vmferry_migration_postcopy_stall_seconds", **vm) == 0
    assert value(after, "kubevirt_vmi_migration_downtime_seconds_count", node=source) == 1
    assert value(after, "vmferry_migration_downtime_seconds_count", node=source) == 1
    downtime = value(after, "kubevirt_vmi_migration_last_downtime_seconds", **vm)
    assert downtime and 0 < downtime < 5
    parts = {
        dict(labels).get("part")
        for (name, labels) in after
        if name == "vmferry_migration_downtime_part_seconds_count"
    }
    assert {"pause", "final_pass", "state_transfer", "verify", "decision", "resume"} <= parts
    for name, mtype in HANDLER_FAMILIES.items():
        assert families(lab, source).get(name) == mtype, name
    # The target sends nothing: no progress series there.
    assert value(lab.scrape(target), "kubevirt_vmi_migration_data_processed_bytes") is None

    # After, on the controller: KubeVirt's counts, outcome, times and phase histogram.
    ctrl = lab.scrape("controller")
    for phase in ("pending", "scheduling", "running", "unset"):
        assert value(ctrl, f"kubevirt_vmi_migrations_in_{phase}_phase") == 0
    ids = {"vmi": "metered", "vmim": vmim, "namespace": "default"}
    assert value(ctrl, "kubevirt_vmi_migration_succeeded", **ids) == 1
    assert value(ctrl, "kubevirt_vmi_migration_failed", **ids) is None
    ms = lab.get("vmi", "metered")["status"]["migrationState"]
    where = {"namespace": "default", "name": "metered", "migration_name": vmim, "node": target}
    start = value(ctrl, "kubevirt_vmi_migration_start_time_seconds", **where)
    end = value(ctrl, "kubevirt_vmi_migration_end_time_seconds", **where, status="succeeded")
    assert start and end and start <= end
    assert ms["startTimestamp"] and ms["endTimestamp"]
    histogram = "kubevirt_vmi_migration_phase_transition_time_from_creation_seconds"
    for phase in ("Scheduling", "Running", "Succeeded"):
        assert (value(ctrl, f"{histogram}_count", phase=phase) or 0) >= 1, phase
    assert (value(ctrl, f"{histogram}_sum", phase="Succeeded") or 0) > 0
    assert not any(name.endswith("_created") for name, _ in ctrl), "no *_created series"
    lab.cli("delete", "vm", "metered")


@pytest.mark.timeout(30)
def test_every_daemon_serves_healthz_readyz_and_head_over_https(lab: LabHarness) -> None:
    for component in ("controller", *lab.lab.node_names()):
        assert lab.fetch_metrics(component, "/healthz")[1] == "ok\n"
        assert lab.fetch_metrics(component, "/readyz")[1] == "ok\n"
        request = urllib.request.Request(lab.metrics_url(component), method="HEAD")
        with urllib.request.urlopen(request, timeout=5, context=lab.metrics_ssl()) as resp:
            assert int(resp.headers["Content-Length"]) > 1000
            assert resp.read() == b""  # curl -I: headers only
    ready = lab.scrape("controller")
    assert any(
        name == "kubevirt_virt_controller_ready_status" and v == 1 for (name, _), v in ready.items()
    )
    # Plain HTTP is not served by default.
    port = lab.info()["metricsPorts"]["controller"]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()


@pytest.mark.timeout(60)
def test_get_vmim_watch_prints_each_phase_as_it_happens(lab: LabHarness) -> None:
    lab.apply(vm_manifest("watched", memory="64Mi", dirty_rate="2Mi"))
    lab.wait_vmi_running("watched")
    watcher = subprocess.Popen(
        [sys.executable, "-m", "vmferry.cli.main", "get", "vmim", "-w"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=lab.env,
    )
    try:
        time.sleep(1.0)  # the watch is established
        out = lab.cli("migrate", "watched", "--wait", timeout=50)
        vmim = migration_name(out.stdout)
        time.sleep(1.0)
    finally:
        watcher.terminate()
        stdout, stderr = watcher.communicate(timeout=10)
    rows = [line.split() for line in stdout.splitlines() if line.startswith(vmim)]
    phases = [row[1] for row in rows]
    assert phases[-1] == "Succeeded", stdout + stderr
    assert {"Scheduling", "Running", "Succeeded"} <= set(phases), phases
    assert phases.index("Running") < phases.index("Succeeded")
    lab.cli("delete", "vm", "watched")


@pytest.mark.timeout(90)
def test_rates_are_live_within_two_seconds_of_a_capped_migration_start(lab: LabHarness) -> None:
    """The transfer and dirty rates of the first round show up while it runs (they read
    0 for the whole first round when they were measured only at a round's end)."""
    lab.apply(vm_manifest("capped", memory="128Mi", dirty_rate="4Mi", hot_set="16Mi"))
    vmi = lab.wait_vmi_running("capped")
    source = vmi["status"]["nodeName"]
    vm = {"namespace": "default", "name": "capped", "node": source}
    cap = 16 << 20
    lab.set_live_migration_config(bandwidthPerMigration="16Mi")  # round 0 alone: several s
    try:
        out = lab.cli("migrate", "capped")
        vmim = migration_name(out.stdout)
        lab.wait_for(
            "the source to start sending",
            lambda: (value(lab.scrape(source), "vmferry_migration_wire_bytes", **vm) or 0) > 0,
            timeout=20,
            interval=0.05,
        )
        first = lab.wait_for(
            "a live transfer rate",
            lambda: (
                (s := lab.scrape(source))
                and (value(s, "kubevirt_vmi_migration_memory_transfer_rate_bytes", **vm) or 0) > 0
                and s
            ),
            timeout=2,
            interval=0.1,
        )
        assert value(first, "vmferry_migration_rounds", **vm) == 0, "still the first round"
        rate = value(first, "kubevirt_vmi_migration_memory_transfer_rate_bytes", **vm) or 0
        assert rate <= 2 * cap, f"{rate / 2**20:.1f} MiB/s under a 16 MiB/s cap"
        dirty = lab.wait_for(
            "a live dirty rate in the first round",
            lambda: (
                (s := lab.scrape(source))
                and (value(s, "kubevirt_vmi_migration_dirty_memory_rate_bytes", **vm) or 0) > 0
                and s
            ),
            timeout=3,
            interval=0.1,
        )
        assert value(dirty, "vmferry_migration_rounds", **vm) == 0, "still the first round"
        final = lab.wait_vmim_final(vmim, timeout=60)
    finally:
        lab.set_live_migration_config(bandwidthPerMigration="0")
    assert final["status"]["phase"] == "Succeeded"
    lab.cli("delete", "vm", "capped")
