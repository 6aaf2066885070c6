"""The qemu bench scenario's pure parts: the guests of each plan, the console check, the
ratios (one stream against QEMU's single stream, N against multifd N, same size and
load) and the table (also when the scenario is unavailable)."""

from __future__ import annotations

import pytest

from bench.qemu_runs import Guest, console_trouble, plan, ratios, table_lines, vm_manifest

MiB = 1 << 20


def _s(median: float) -> dict[str, float]:
    return {"n": 2, "median": median, "min": median, "max": median, "p99": median, "mean": median}


@pytest.mark.timeout(10)
def test_the_quick_plan_is_small_and_the_full_plan_covers_every_combination() -> None:
    quick = plan(quick=True)
    assert {g.memory for g in quick} == {"512Mi"} and not any(g.dirtying for g in quick)
    assert sum(len(g.streams) for g in quick) == 3
    full = plan(quick=False)
    combos = {(g.memory, g.dirtying, g.verify, s) for g in full for s in g.streams}
    for memory in ("512Mi", "2Gi"):
        for dirtying in (False, True):
            assert (memory, dirtying, "repair", 1) in combos
            assert (memory, dirtying, "repair", 2) in combos
            assert (memory, dirtying, "detect", 1) in combos
            assert (memory, dirtying, "off", 1) in combos


@pytest.mark.timeout(10)
def test_a_guest_fills_most_of_its_ram_and_dirties_only_when_asked(tmp_path: object) -> None:
    idle, busy = Guest("2Gi", False, "repair", (1,)), Guest("2Gi", True, "off", (1,))
    assert "memload.fill=1536 memload.rate=0 " in idle.cmdline
    assert "memload.rate=16 " in busy.cmdline
    vm = vm_manifest(busy, tmp_path)  # type: ignore[arg-type]
    q = vm["spec"]["template"]["spec"]["qemu"]
    assert q["verify"] == "off" and q["accelerator"] == "tcg"
    assert vm["metadata"]["name"] == "q2gi-dirt-off"


@pytest.mark.timeout(10)
def test_console_trouble_finds_panics_and_lost_pages() -> None:
    assert console_trouble("HB 1 2 50.0 0\nHB 2 3 50.0 0\n") is None
    assert console_trouble("HB 1\nKernel panic - not syncing: x\nmore") == (
        "Kernel panic - not syncing: x"
    )
    assert console_trouble("CORRUPT page=12 want=1 got=2\n").startswith("CORRUPT page=12")


def _ours(memory: int, streams: int, load: str, tput: float, wire: float) -> dict[str, object]:
    return {
        "memoryBytes": memory,
        "streams": streams,
        "load": load,
        "verify": "repair",
        "records": [],
        "failed": 0,
        "consoleTrouble": [],
        "summary": {"throughput": _s(tput), "wireRate": _s(wire)},
    }


def _peer(memory: int, multifd: int, load: str, tput: float, wire: float) -> dict[str, object]:
    return {
        "memoryBytes": memory,
        "multifd": multifd,
        "load": load,
        "records": [],
        "summary": {"throughput": _s(tput), "wireRate": _s(wire)},
    }


@pytest.mark.timeout(10)
def test_ratios_pair_single_with_single_and_streams_with_multifd() -> None:
    result = {
        "ours": {
            "a": _ours(512 * MiB, 1, "idle", 180 * MiB, 200 * MiB),
            "b": _ours(512 * MiB, 2, "idle", 150 * MiB, 150 * MiB),
            "c": _ours(2048 * MiB, 1, "idle", 100 * MiB, 100 * MiB),  # no QEMU peer
        },
        "peers": {
            "p1": _peer(512 * MiB, 0, "idle", 200 * MiB, 200 * MiB),
            "p2": _peer(512 * MiB, 2, "idle", 100 * MiB, 300 * MiB),
            "p3": _peer(512 * MiB, 0, "dirtying", 1 * MiB, 1 * MiB),
        },
    }
    r = ratios(result)
    assert r["a"] == {"throughput": pytest.approx(0.9), "wireRate": pytest.approx(1.0)}
    assert r["b"] == {"throughput": pytest.approx(1.5), "wireRate": pytest.approx(0.5)}
    assert "c" not in r
    result["ratios"] = r
    result["runs"] = 2
    text = "\n".join(table_lines(result))
    assert "0.90x" in text and "1.50x" in text and "QEMU alone" in text


@pytest.mark.timeout(10)
def test_the_table_says_why_the_scenario_did_not_run() -> None:
    lines = table_lines({"unavailable": "no guest image in /x (make guest-image)"})
    assert lines[-1] == "  qemu unavailable: no guest image in /x (make guest-image)"
