"""The scale bench's simulated handlers answer a migration as the real ones do, step
by step, with the fields the controller follows (no memory moved)."""

from __future__ import annotations

from typing import Any

from bench.scale_runs import migration_step
from vmferry.migration_state import AbortStatus, Field, MigrationState, Switchover

NOW = "2026-01-01T00:00:00Z"


def handed_off() -> dict[str, Any]:
    return {
        "metadata": {"name": "vm", "namespace": "scale", "resourceVersion": "5"},
        "status": {
            "phase": "Running",
            "nodeName": "sim-0000",
            "migrationState": {
                Field.MIGRATION_UID: "u1",
                Field.SOURCE_NODE: "sim-0000",
                Field.TARGET_NODE: "sim-0001",
            },
        },
    }


def test_a_handed_off_vmi_is_prepared_started_and_completed_on_the_target() -> None:
    vmi = handed_off()
    steps = []
    while (step := migration_step(vmi, NOW)) is not None:
        steps.append(dict(step["status"]["migrationState"]))
        vmi = step
        assert len(steps) < 10
    assert len(steps) == 3
    assert steps[0][Field.TARGET_NODE_DOMAIN_DETECTED] and steps[0][Field.TARGET_NODE_ADDRESS]
    assert steps[1][Field.START_TIMESTAMP] == NOW
    ms = MigrationState.of(vmi)
    assert ms.completed and ms.switchover == Switchover.COMMITTED
    assert vmi["status"]["nodeName"] == "sim-0001"
    assert vmi["metadata"]["resourceVersion"] == "5"  # the write's precondition


def test_an_abort_before_the_decision_leaves_the_vm_on_its_source() -> None:
    vmi = handed_off()
    vmi["status"]["migrationState"][Field.ABORT_REQUESTED] = True
    step = migration_step(vmi, NOW)
    assert step is not None
    ms = step["status"]["migrationState"]
    assert ms[Field.FAILED] and ms[Field.ABORT_STATUS] == AbortStatus.SUCCEEDED
    assert step["status"]["nodeName"] == "sim-0000"
    assert migration_step(step, NOW) is None


def test_nothing_to_answer_without_a_migration_or_before_running() -> None:
    vmi = handed_off()
    vmi["status"]["phase"] = "Scheduled"
    assert migration_step(vmi, NOW) is None
    vmi = handed_off()
    del vmi["status"]["migrationState"]
    assert migration_step(vmi, NOW) is None
