"""The cross-cluster bench scenario's pure parts: the receiving copy of a VM, the
comparison with the 10% bar, the table (also when the scenario is unavailable)."""

from __future__ import annotations

import pytest

from bench.lab_runs import vm_manifest
from bench.xcluster_runs import _receiver_copy, compare, table_lines
from vmferry.decentralized import RESTORE_RUN_STRATEGY_ANNOTATION, RUN_STRATEGY_WAIT_AS_RECEIVER

MiB = 1 << 20


def _s(median: float) -> dict[str, float]:
    return {"n": 3, "median": median, "min": median, "max": median, "p99": median, "mean": median}


@pytest.mark.timeout(10)
def test_receiver_copy() -> None:
    vm = vm_manifest("xvm-1", "256Mi", "random", dirty_rate="50Mi")
    copy = _receiver_copy(vm)
    assert copy["spec"]["runStrategy"] == RUN_STRATEGY_WAIT_AS_RECEIVER
    assert copy["metadata"]["annotations"] == {RESTORE_RUN_STRATEGY_ANNOTATION: "Always"}
    assert copy["spec"]["template"] == vm["spec"]["template"]
    assert vm["spec"]["runStrategy"] == "Always"  # the original is untouched


@pytest.mark.timeout(10)
def test_compare_applies_the_10_percent_bar() -> None:
    inside = {"throughput": _s(1000 * MiB), "guestDowntimeMilliseconds": _s(100)}
    close = compare(inside, {"throughput": _s(950 * MiB), "guestDowntimeMilliseconds": _s(109)})
    assert (
        close["throughput"]["within10Percent"]
        and close["guestDowntimeMilliseconds"]["within10Percent"]
    )
    far = compare(inside, {"throughput": _s(800 * MiB), "guestDowntimeMilliseconds": _s(150)})
    assert not far["throughput"]["within10Percent"]
    assert not far["guestDowntimeMilliseconds"]["within10Percent"]
    assert compare(inside, {"throughput": None})["throughput"] is None


@pytest.mark.timeout(10)
def test_table_lines() -> None:
    lines = table_lines({"title": "t", "unavailable": "no sync controllers"})
    assert "  cross-cluster unavailable: no sync controllers" in lines
    inside = {"throughput": _s(1000 * MiB), "guestDowntimeMilliseconds": _s(100)}
    across = {"throughput": _s(960 * MiB), "guestDowntimeMilliseconds": _s(104)}
    text = "\n".join(
        table_lines(
            {
                "title": "t",
                "inside": {"summary": inside},
                "across": {"summary": across},
                "ratios": compare(inside, across),
            }
        )
    )
    assert "inside cluster1" in text and "cluster1 -> cluster2" in text
    assert "1000 MiB/s" in text and "960 MiB/s" in text
    assert "throughput: across/inside 0.96 (within 10%)" in text
