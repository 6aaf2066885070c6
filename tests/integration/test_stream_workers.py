"""Migration streams in worker processes (``vmferry lab up --stream-workers 1``): channel 1
of every migration runs in a stream worker of each handler, the digest is verified, and a
worker killed mid-round costs a reconnect, not the VM."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.lab_runs import stream_workers_of
from tests.support.lab import LabHarness, migration_name, vm_manifest


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHarness]:
    harness = LabHarness(Path(tmp_path_factory.mktemp("lab")))
    harness.up(nodes=2, stream_workers=1)
    try:
        yield harness
    finally:
        harness.down()


def _log(lab: LabHarness, node: str) -> str:
    return (lab.lab.log_dir / f"{node}.log").read_text(errors="replace")


def _workers(lab: LabHarness, node: str) -> list[int]:
    pid = lab.lab.pid(node)
    assert pid is not None
    return stream_workers_of(pid)


def _migrated(lab: LabHarness, name: str) -> dict[str, Any]:
    out = lab.cli("migrate", name, "--wait", timeout=150)
    assert "succeeded" in out.stdout, out.stdout
    vmi = lab.get("vmi", name)
    ms = vmi["status"]["migrationState"]
    transfer = ms["transfer"]
    assert ms["completed"] is True and ms["switchover"] == "Committed"
    assert transfer["digestVerified"] is True
    assert transfer["digest"] == transfer["targetDigest"]
    assert lab.get("vmim", migration_name(out.stdout))["status"]["phase"] == "Succeeded"
    return ms


@pytest.mark.timeout(240)
def test_channel_1_runs_in_the_workers_of_both_handlers_both_ways(lab: LabHarness) -> None:
    assert all(len(_workers(lab, n)) == 1 for n in ("node1", "node2"))
    lab.apply(vm_manifest("wvm", memory="256Mi", dirty_rate="16Mi", hot_set="32Mi"))
    vmi = lab.wait_vmi_running("wvm")
    uid, first = vmi["metadata"]["uid"], vmi["status"]["nodeName"]
    time.sleep(0.5)
    ms = _migrated(lab, "wvm")
    second = str(ms["targetNode"])
    assert second != first
    mig = str(ms["migrationUid"])
    assert f"migration {mig}: channels 1-1 run in stream workers" in _log(lab, first)
    assert f"migration {mig}: channels 1-1 served by stream workers" in _log(lab, second)
    # and back: each handler's worker now has the other role
    ms = _migrated(lab, "wvm")
    assert ms["targetNode"] == first
    mig = str(ms["migrationUid"])
    assert f"migration {mig}: channels 1-1 run in stream workers" in _log(lab, second)
    assert f"migration {mig}: channels 1-1 served by stream workers" in _log(lab, first)
    guests = lab.wait_for("one guest", lambda: (g := lab.guests(uid)) and len(g) == 1 and g)
    assert [node for node, _ in guests] == [first]
    # the shared digest tables are gone with their migrations
    for n in ("node1", "node2"):
        assert not list(lab.lab.ram_dir(n).glob("*-digest"))
    lab.cli("delete", "vm", "wvm")


@pytest.mark.parametrize("side", ["source", "target"])
@pytest.mark.timeout(240)
def test_a_worker_killed_mid_round_costs_a_reconnect_not_the_vm(lab: LabHarness, side: str) -> None:
    name = f"kill-{side}"
    lab.apply(vm_manifest(name, memory="512Mi", dirty_rate="4Mi", hot_set="16Mi"))
    vmi = lab.wait_vmi_running(name)
    source = vmi["status"]["nodeName"]
    target = "node2" if source == "node1" else "node1"
    victim_node = source if side == "source" else target
    [victim] = _workers(lab, victim_node)
    lab.set_live_migration_config(bandwidthPerMigration="48Mi")  # ~10 s of round 0
    try:
        proc = lab.cli_background("migrate", name, "--wait")
        lab.wait_for(
            "round 0 to be under way",
            lambda: (
                "run in stream workers" in _log(lab, source)
                and (lab.get("vmi", name)["status"].get("migrationState") or {})
                .get("transfer", {})
                .get("dataProcessedBytes", 0)
                > 64 << 20
            ),
            60,
        )
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0 and "succeeded" in out, out
    finally:
        lab.set_live_migration_config(bandwidthPerMigration="0")
    ms = lab.get("vmi", name)["status"]["migrationState"]
    assert ms["transfer"]["digestVerified"] is True and ms["targetNode"] == target
    assert "reconnected to" in _log(lab, source)
    # the pool replaced the dead worker
    lab.wait_for(
        "a new stream worker", lambda: (w := _workers(lab, victim_node)) and victim not in w, 30
    )
    lab.cli("delete", "vm", name)
