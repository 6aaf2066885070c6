"""CLI progress rendering: one migration and several, on a terminal and not."""

from __future__ import annotations

import io
from typing import Any

from vmferry.cli.progress import MigrationProgress, MultiMigrationProgress, bar, migration_line

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def vmim(name: str, phase: str, processed: int = 0, total: int = 0, **transfer: Any) -> dict:
    t = {"dataTotalBytes": total, "dataProcessedBytes": processed, **transfer}
    return {
        "metadata": {"namespace": "default", "name": name},
        "status": {"phase": phase, "migrationState": {"transfer": t}},
    }


def test_bar_fills_with_the_fraction() -> None:
    assert bar(0, 10) == "[>         ]"
    assert bar(0.5, 10) == "[=====>    ]"
    assert bar(1, 10) == "[==========]"
    assert bar(7, 10) == "[==========]"


def test_line_shows_bytes_rate_round_and_eta() -> None:
    line = migration_line(
        vmim(
            "m",
            "Running",
            processed=64 * MiB,
            total=256 * MiB,
            dataRemainingBytes=192 * MiB,
            transferRateBytes=64 * MiB,
            rounds=2,
        ),
        elapsed=1.5,
    )
    assert line.startswith("Running")
    assert "64 MiB sent" in line and "64 MiB/s" in line and "round 2" in line
    assert "ETA 3.0s" in line and line.endswith("1.5s")


def test_rate_is_estimated_while_the_source_has_not_reported_one() -> None:
    clock = Clock()
    out = io.StringIO()
    p = MigrationProgress(out, tty=False, clock=clock)
    p.update(vmim("m", "Running", 0, 100 * MiB, dataRemainingBytes=100 * MiB))
    clock.now += 1
    p.update(vmim("m", "Running", 20 * MiB, 100 * MiB, dataRemainingBytes=80 * MiB))
    last = out.getvalue().splitlines()[-1]
    assert "20 MiB/s" in last and "ETA 4.0s" in last


def test_plain_output_prints_phase_changes_and_throttles_repeats() -> None:
    clock = Clock()
    out = io.StringIO()
    p = MigrationProgress(out, tty=False, clock=clock)
    for phase in ("Pending", "Scheduling", "Running", "Running", "Running"):
        p.update(vmim("m", phase, 1, 10))
        clock.now += 0.1
    clock.now += 1
    p.update(vmim("m", "Running", 5, 10))
    p.update(vmim("m", "Succeeded", 10, 10))
    p.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == [
        "Pending",
        "Scheduling",
        "Running",
        "Running",
        "Succeeded",
    ]
    assert "\033" not in out.getvalue(), "no terminal escapes when not on a terminal"


def test_terminal_output_rewrites_one_line() -> None:
    out = io.StringIO()
    p = MigrationProgress(out, tty=True, clock=Clock())
    p.update(vmim("m", "Running", 1, 10))
    p.update(vmim("m", "Succeeded", 10, 10))
    p.close()
    text = out.getvalue()
    assert text.count("\r\033[K") == 2 and text.endswith("\n") and text.count("\n") == 1


def test_failed_line_says_why() -> None:
    v = vmim("m", "Failed", 1, 10)
    v["status"]["migrationState"]["failureReason"] = "canceled by the user"
    assert "canceled by the user" in migration_line(v, 2.0)


def test_several_migrations_on_a_terminal_redraw_as_a_block() -> None:
    out = io.StringIO()
    p = MultiMigrationProgress(out, tty=True, title="draining node1", clock=Clock())
    p.update(vmim("vm-a", "Running", 5, 10))
    p.update(vmim("vm-bb", "Pending"))
    p.update(vmim("vm-a", "Succeeded", 10, 10))
    assert p.lines()[0].startswith("vm-a   Succeeded")
    assert p.summary().startswith("draining node1: 1/2 succeeded")
    assert "\033[2A" in out.getvalue(), "the cursor goes back up over the block"
    p.close()


def test_several_migrations_without_a_terminal_print_named_lines_and_a_summary() -> None:
    clock = Clock()
    out = io.StringIO()
    p = MultiMigrationProgress(out, tty=False, title="draining node1", clock=clock)
    p.update(vmim("vm-a", "Running", 5, 10))
    p.update(vmim("vm-b", "Running", 1, 10))
    p.update(vmim("vm-a", "Running", 6, 10))  # same phase, too soon: not printed
    p.update(vmim("vm-a", "Failed", 6, 10))
    p.update(vmim("vm-b", "Succeeded", 10, 10))
    p.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [
        ["vm-a", "Running"],
        ["vm-b", "Running"],
        ["vm-a", "Failed"],
        ["vm-b", "Succeeded"],
    ]
    assert lines[-1].startswith("draining node1: 1/2 succeeded, 1 failed")
