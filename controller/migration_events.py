"""The migration controller's Events: what a VMIM (and its VMI) went through, in words a
``describe`` reader understands. KubeVirt's reasons and messages where it has them
(virt-controller's ``SuccessfulMigration`` "Source node reported migration succeeded",
virt-handler's ``Migrating``/``Migrated`` on the VMI)."""

from __future__ import annotations

from typing import Any

from vmferry.events import EventRecorder, Reason
from vmferry.migration_state import AbortStatus, Field, MigrationMode, MigrationPhase

Obj = dict[str, Any]


class MigrationEvents:
    def __init__(self, recorder: EventRecorder) -> None:
        self.recorder = recorder

    def phase(
        self,
        vmim: Obj,
        phase: MigrationPhase,
        *,
        vmi: Obj | None = None,
        reason: str = "",
        abort_status: AbortStatus | None = None,
    ) -> None:
        """The VMIM entered ``phase`` (``reason``: why it failed)."""
        ms = (vmim.get("status") or {}).get("migrationState") or {}
        source = ms.get(Field.SOURCE_NODE, "")
        target = ms.get(Field.TARGET_NODE, "")
        rec = self.recorder
        if phase == MigrationPhase.SCHEDULING:
            rec.normal(vmim, Reason.MIGRATING, "Migration admitted: choosing a target node")
        elif phase == MigrationPhase.SCHEDULED:
            rec.normal(
                vmim,
                Reason.MIGRATION_SCHEDULED,
                f"Migration target node {target} chosen (source node {source})",
            )
        elif phase == MigrationPhase.PREPARING_TARGET:
            rec.normal(
                vmim, Reason.PREPARING_TARGET, f"Target node {target} is preparing the guest"
            )
        elif phase == MigrationPhase.TARGET_READY:
            rec.normal(vmim, Reason.PREPARING_TARGET, f"Target node {target} is ready to receive")
        elif phase == MigrationPhase.RUNNING:
            rec.normal(vmim, Reason.MIGRATING, f"Copying memory from {source} to {target}")
            if vmi is not None:
                rec.normal(vmi, Reason.MIGRATING, "VirtualMachineInstance is migrating.")
        elif phase == MigrationPhase.SUCCEEDED:
            rec.normal(
                vmim, Reason.SUCCESSFUL_MIGRATION, "Source node reported migration succeeded"
            )
            if vmi is not None:
                rec.normal(
                    vmi,
                    Reason.MIGRATED,
                    f"The VirtualMachineInstance migrated to node {target}.",
                )
        elif phase == MigrationPhase.FAILED:
            if abort_status == AbortStatus.SUCCEEDED:
                rec.normal(vmim, Reason.SUCCESSFUL_ABORT_MIGRATION, f"Migration aborted: {reason}")
                return
            message = f"Migration failed: {reason or 'no reason recorded'}"
            rec.warning(vmim, Reason.FAILED_MIGRATION, message)
            if vmi is not None:
                name = vmim["metadata"]["name"]
                rec.warning(vmi, Reason.FAILED_MIGRATION, f"{message} (migration {name})")

    def waiting(self, vmim: Obj, why: str) -> None:
        """Pending: the parallel-migration limits hold it back (a throttle)."""
        self.recorder.normal(vmim, Reason.MIGRATION_PENDING, f"Waiting to start: {why}")

    def unschedulable(self, vmim: Obj, message: str) -> None:
        self.recorder.warning(vmim, Reason.FAILED_SCHEDULING, message)

    def abort_requested(self, vmim: Obj) -> None:
        self.recorder.normal(
            vmim, Reason.MIGRATING, "Cancel requested while running: asking the source to abort"
        )

    def repaired(self, vmim: Obj, target: str) -> None:
        self.recorder.warning(
            vmim,
            Reason.MIGRATION_REPAIRED,
            f"The VM runs on {target} since the hand-off but no handler recorded the "
            "completion: the controller recorded it",
        )

    def mirrored(self, vmim: Obj, before: Obj, after: Obj) -> None:
        """The source's record changed (``before`` → ``after``): a switch to post-copy."""
        if (
            after.get(Field.MODE) == MigrationMode.POST_COPY
            and before.get(Field.MODE) != MigrationMode.POST_COPY
        ):
            self.recorder.normal(
                vmim,
                Reason.POST_COPY_SWITCH,
                f"Switched to post-copy: the guest runs on {after.get(Field.TARGET_NODE, '')}; "
                "the remaining memory follows on demand",
            )
