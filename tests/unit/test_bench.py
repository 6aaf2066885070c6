"""The bench's statistics, ratios and log/profile parsing (no lab, no QEMU: fast)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from bench import run
from bench.lab_runs import parse_source_log, read_log_events
from bench.profile import top_entries
from bench.stats import (
    fmt_ratio,
    fmt_summary,
    load_warning,
    per_gib,
    percentile,
    ratio,
    summaries,
    summarize,
)


def test_percentile_interpolates_like_numpy() -> None:
    values = [10.0, 20.0, 30.0, 40.0]
    assert percentile(values, 0) == 10
    assert percentile(values, 100) == 40
    assert percentile(values, 50) == 25
    assert percentile([5.0], 99) == 5
    assert percentile(list(range(1, 11)), 99) == pytest.approx(9.91)
    assert percentile([3.0, 1.0, 2.0], 50) == 2  # order does not matter


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_rejects_bad_input(q: float) -> None:
    with pytest.raises(ValueError):
        percentile([1.0], q)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_median_min_max_p99_and_nan() -> None:
    s = summarize([3.0, 1.0, math.nan, 2.0, 100.0])
    assert s is not None
    assert (s.n, s.median, s.min, s.max) == (4, 2.5, 1.0, 100.0)
    assert s.p99 == pytest.approx(97.09)
    assert s.mean == pytest.approx(26.5)
    assert s.spread == pytest.approx(99 / 2.5)
    assert summarize([]) is None
    assert summarize([math.nan]) is None


def test_summaries_skip_missing_fields() -> None:
    records = [{"a": 1, "b": None}, {"a": 3}, {"b": 2}]
    out = summaries(records, ["a", "b", "c"])
    assert out["a"] is not None and out["a"].median == 2
    assert out["b"] is not None and out["b"].n == 1
    assert out["c"] is None


def test_ratio_and_formatting() -> None:
    assert ratio(300.0, 100.0) == 3.0
    assert ratio(None, 100.0) is None
    assert ratio(1.0, 0.0) is None
    assert ratio(1.0, None) is None
    assert ratio(math.nan, 1.0) is None
    assert fmt_ratio(2.345) == "2.35x"
    assert fmt_ratio(None) == "-"
    s = summarize([1 << 20, 2 << 20, 3 << 20])
    assert fmt_summary(s, "MiB/s", 1 << 20) == "2.0 [1.0..3.0] MiB/s"
    assert fmt_summary(summarize([5.0]), "s") == "5.0 s"
    assert fmt_summary(None, "s") == "-"


def test_compute_ratios_uses_medians_of_ours_peers_and_ceiling() -> None:
    def summary(*values: float) -> dict[str, object]:
        s = summarize(values)
        assert s is not None
        return {"throughput": s.as_dict()}

    results: dict[str, object] = {
        "grpc": {"grpc-mtls-1stream": {"summary": summary(400, 200, 300)}},
        "scenarios": {
            "random": {
                "ours": {"summary": summary(150, 160, 140)},
                "peers": {"qemu-tls-single": {"summary": summary(50, 60, 40)}},
            }
        },
    }
    run.compute_ratios(results)
    ratios = results["scenarios"]["random"]["ratios"]  # type: ignore[index]
    assert ratios["qemu-tls-single"] == pytest.approx(3.0)
    assert ratios["grpc-mtls-1stream"] == pytest.approx(0.5)


def test_source_log_gives_start_first_byte_and_end(tmp_path: Path) -> None:
    uid = "abc-123"
    log = tmp_path / "node1.log"
    log.write_text(
        "\n".join(
            [
                f'ts=2026-01-01T00:00:00.100Z level=info component=handler logger=x msg="migration {uid}: default/vm starting to 127.0.1.2:1"',
                f'ts=2026-01-01T00:00:02.200Z level=info component=handler logger=x msg="migration {uid}: round 0 sent 65600 pages in 2.000s (128 MiB/s); 3 dirty (0.0 MiB/s)"',
                'ts=2026-01-01T00:00:02.300Z level=info component=handler logger=x msg="migration other: succeeded: x"',
                f'ts=2026-01-01T00:00:02.500Z level=info component=handler logger=x msg="migration {uid}: switchover Committed recorded"',
                f'ts=2026-01-01T00:00:02.600Z level=info component=handler logger=x msg="migration {uid}: succeeded: 2 rounds"',
            ]
        )
    )
    parsed = parse_source_log(read_log_events(log, uid))
    assert parsed["firstByte"] - parsed["handlerStart"] == pytest.approx(0.1, abs=1e-3)
    assert parsed["handlerSucceeded"] - parsed["handlerStart"] == pytest.approx(2.5, abs=1e-3)
    assert parsed["handOffCommitted"] < parsed["handlerSucceeded"]
    [rnd] = parsed["roundLog"]
    assert (rnd["round"], rnd["pages"], rnd["dirtyPages"]) == (0, 65600, 3)


def test_profile_top_entries_from_collapsed_stacks() -> None:
    text = "\n".join(
        [
            "thread (11): MainThread;run (asyncio/runners.py:1);main (a.py:1);hot (b/c.py:10) 30",
            "thread (11): MainThread;run (asyncio/runners.py:1);main (a.py:1);hot (b/c.py:12) 10",
            "thread (12): asyncio_0;worker (w.py:5);copy (w.py:9) 35",
            "thread (13): asyncio_1;worker (w.py:5);copy (w.py:9) 25",
        ]
    )
    top = top_entries(text)
    assert top["samples"] == 100
    assert top["self"][0] == {"function": "copy (w.py)", "samples": 60, "percent": 60.0}
    assert {"function": "hot (b/c.py)", "samples": 40, "percent": 40.0} in top["self"]
    incl = {e["function"]: e["samples"] for e in top["inclusive"]}
    assert incl["main (a.py)"] == 40
    assert "run (asyncio/runners.py)" not in incl  # generic frames are left out
    assert [e["function"] for e in top["eventLoopSelf"]] == ["hot (b/c.py)"]
    assert [(t["thread"], t["samples"]) for t in top["threads"]] == [
        ("asyncio", 60),
        ("MainThread", 40),
    ]


def test_cpu_per_gib_and_load_warning() -> None:
    assert per_gib(2.0, 1 << 30) == pytest.approx(2.0)
    assert per_gib(1.0, 4 << 30) == pytest.approx(0.25)
    assert per_gib(None, 1 << 30) is None
    assert per_gib(1.0, 0) is None
    assert per_gib(1.0, None) is None
    assert load_warning(0.5) is None
    warning = load_warning(2.04)
    assert warning is not None and "2.04" in warning and "not quiet" in warning


def test_table_prints_cpu_per_gib_load_and_the_warning() -> None:
    def summ(**values: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in values.items():
            s = summarize([value])
            assert s is not None
            out[key] = s.as_dict()
        return out

    ours: dict[str, Any] = dict.fromkeys(run.OUR_KEYS)
    ours.update(summ(throughput=400 * (1 << 20), cpuPerGiB_source=1.25, cpuPerGiB_target=1.5))
    machine: dict[str, object] = {
        "started": "now",
        "cpus": 2,
        "python": "3.11",
        "grpcio": "1",
        "qemu": None,
        "loadavgStart": [1.5, 1.0, 1.0],
        "loadavgEnd": [2.5, 1.0, 1.0],
    }
    results: dict[str, object] = {
        "machine": machine,
        "grpc": {
            "grpc-mtls-1stream": {
                "summary": summ(
                    throughput=900 * (1 << 20), cpuPerGiBClient=0.61, cpuPerGiBServer=0.72
                )
            }
        },
        "scenarios": {
            "random": {
                "title": "random memory",
                "memory": "1Gi",
                "memoryBytes": 1 << 30,
                "content": "random",
                "dirtyRate": "0",
                "touched": "0",
                "runs": 1,
                "ours": {
                    "records": [{"phase": "Succeeded"}],
                    "summary": ours,
                },
                "peers": {},
                "ratios": {},
            }
        },
    }
    text = run.table(results)
    assert "load average at start 1.50, at end 2.50" in text
    assert "WARNING: load average 1.50" in text
    assert "CPU s/GiB client 0.61, server 0.72" in text
    assert "ours: CPU s/GiB" in text and "source 1.25, target 1.50" in text
    quiet = {**results, "machine": {**machine, "loadavgStart": [0.2, 0.0, 0.0]}}
    assert "WARNING" not in run.table(quiet)
