"""The migration reconciler with fakes: a real Store in a temporary directory, the
controller's informers fed from it by hand, handlers played by writes into the VMI's
``migrationState``, and a fake clock for the timeouts.

Covers admission (parallel limits, priority), the hand-off written exactly once (even
when the pass fails between the VMI and the VMIM writes), the token Secret's lifecycle
(never in a status, readable by the two nodes only, deleted at the end), failure before
start (target not Ready, prepare timeout), cancel before start and while running,
completion, and the garbage collection of old VMIMs.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from controller import migration_token
from controller.main import bootstrap
from controller.migration_controller import (
    FINALIZER,
    HANDOFF_COMPLETION_GRACE,
    KEEP_FINISHED,
    TARGET_PREPARE_TIMEOUT,
    MigrationController,
    mirror_of,
)
from controller.migration_queue import EVACUATION_ANNOTATION
from controller.objects import StoreSource
from controller.store import Store
from tests.support.fake_api import FakeClock
from vmferry.errors import NotFound, Unavailable
from vmferry.informer import Informer
from vmferry.migration_state import (
    PROGRESS_PHASES,
    TOKEN_SECRET_KEY,
    TOKEN_SECRET_NAMESPACE,
    AbortStatus,
    ConfigKey,
    Field,
    MigrationMode,
    MigrationPhase,
    Switchover,
    VMIPhase,
    raw,
    token_secret_name,
)
from vmferry.objects import kinds

pytestmark = pytest.mark.timeout(30)
Obj = dict[str, Any]
NS = "default"
VMIM = "VirtualMachineInstanceMigration"
VMI = "VirtualMachineInstance"


def node(name: str, ready: bool = True) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {
            "capacity": {"memory": "4Gi"},
            "nodeInfo": {"cpuModel": "model-a"},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


class Cluster:
    """One controller over a real store; ``reconcile`` refreshes the informers first."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.clock = FakeClock(time.time())
        source = StoreSource(store)
        self.informers = {
            kind: Informer(source, kind) for kind in (VMIM, VMI, "Node", "HyperConverged")
        }
        self.ctl = MigrationController(
            store,
            self.informers[VMIM],
            self.informers[VMI],
            self.informers["Node"],
            self.informers["HyperConverged"],
            clock=self.clock,
        )

    async def refresh(self) -> None:
        """Bring every informer's cache up to the store (the watch events, by hand)."""
        for kind, informer in self.informers.items():
            items, _ = await self.store.list(kind)
            fresh = {(o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in items}
            for obj in list(informer.cache.values()):
                key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
                if key not in fresh:
                    informer.apply_event("DELETED", obj)
            for obj in items:
                informer.apply_event("MODIFIED", obj)

    async def reconcile(self, name: str) -> None:
        await self.refresh()
        await self.ctl.reconcile((NS, name))

    # -- objects ---------------------------------------------------------------------------

    async def add_node(self, name: str, ready: bool = True) -> None:
        await self.store.create(node(name, ready))

    async def set_ready(self, name: str, ready: bool) -> None:
        current = await self.store.get("Node", "", name)
        current["status"]["conditions"][0]["status"] = "True" if ready else "False"
        await self.store.update(current, subresource="status")

    async def add_vmi(self, name: str, on: str) -> None:
        vmi = await self.store.create(
            {
                "apiVersion": kinds.KUBEVIRT,
                "kind": VMI,
                "metadata": {"name": name, "namespace": NS},
                "spec": {"domain": {"memory": {"guest": "64Mi"}}},
            }
        )
        vmi["status"] = {"phase": VMIPhase.RUNNING, "nodeName": on}
        await self.store.update(vmi, subresource="status")

    async def add_vmim(self, name: str, vmi: str, evacuation: bool = False) -> str:
        meta: Obj = {"name": name, "namespace": NS}
        if evacuation:
            meta["annotations"] = {EVACUATION_ANNOTATION: "node1"}
        created = await self.store.create(
            {"apiVersion": kinds.KUBEVIRT, "kind": VMIM, "metadata": meta, "spec": {"vmiName": vmi}}
        )
        return str(created["metadata"]["uid"])

    async def set_config(self, **config: int) -> None:
        hco = await self.store.get(
            "HyperConverged", kinds.SYSTEM_NAMESPACE, kinds.HYPERCONVERGED_NAME
        )
        hco["spec"].setdefault("liveMigrationConfig", {}).update(config)
        await self.store.update(hco)

    async def vmim(self, name: str) -> Obj:
        return await self.store.get(VMIM, NS, name)

    async def phase(self, name: str) -> MigrationPhase:
        return MigrationPhase.of(await self.vmim(name))

    async def vmi(self, name: str) -> Obj:
        return await self.store.get(VMI, NS, name)

    async def handler_writes(self, vmi_name: str, **fields: Any) -> None:
        """What a handler does: merge ``fields`` into the VMI's migrationState."""
        vmi = await self.vmi(vmi_name)
        vmi["status"]["migrationState"].update(fields)
        await self.store.update(vmi, subresource="status")

    async def token_secrets(self) -> list[Obj]:
        items, _ = await self.store.list("Secret", TOKEN_SECRET_NAMESPACE)
        return [s for s in items if s["metadata"]["name"].startswith("vmferry-migration-")]

    async def token_of(self, uid: str) -> str:
        secret = await self.store.get("Secret", TOKEN_SECRET_NAMESPACE, token_secret_name(uid))
        return base64.b64decode(secret["data"][TOKEN_SECRET_KEY]).decode()

    # -- driving a migration -----------------------------------------------------------------

    async def to_phase(self, name: str, phase: MigrationPhase, vmi: str = "vm") -> None:
        """Reconcile (playing the handlers) until the VMIM reaches ``phase``."""
        handler_steps = {
            MigrationPhase.SCHEDULED: {Field.TARGET_NODE_DOMAIN_DETECTED: True},
            MigrationPhase.PREPARING_TARGET: {
                Field.TARGET_NODE_ADDRESS: "192.0.2.2",
                Field.TARGET_NODE_PORT: 7000,
            },
            MigrationPhase.TARGET_READY: {
                Field.START_TIMESTAMP: "2026-01-01T00:00:00Z",
                Field.MODE: MigrationMode.PRE_COPY,
            },
        }
        for _ in range(10):
            current = await self.phase(name)
            if current == phase:
                return
            if current in handler_steps:
                await self.handler_writes(vmi, **handler_steps[current])
            await self.reconcile(name)
        raise AssertionError(f"{name} stuck in {await self.phase(name)}, wanted {phase}")


def run(test: Callable[[Cluster], Awaitable[None]], tmp_path: Path) -> None:
    """A cluster with three Ready nodes and a VMI "vm" on node1, then ``test``."""

    async def main() -> None:
        store = await Store.open(tmp_path / "store.db")
        try:
            await bootstrap(store)
            cluster = Cluster(store)
            for name in ("node1", "node2", "node3"):
                await cluster.add_node(name)
            await cluster.add_vmi("vm", "node1")
            await test(cluster)
        finally:
            await store.close()

    asyncio.run(main())


def assert_no_token_in(obj: Obj) -> None:
    ms = raw(obj)
    assert ms and "token" not in ms, f"a token in {obj['kind']} status: {sorted(ms)}"


# -- admission ----------------------------------------------------------------------------


def test_admission_keeps_the_parallel_limits_in_priority_order(tmp_path: Path) -> None:
    async def test(c: Cluster) -> None:
        await c.set_config(
            **{
                ConfigKey.PARALLEL_MIGRATIONS_PER_CLUSTER: 2,
                ConfigKey.PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE: 1,
            }
        )
        await c.add_vmi("b", "node1")
        await c.add_vmi("c", "node2")
        await c.add_vmi("d", "node3")
        await c.add_vmim("m-a", "vm")  # node1
        await c.add_vmim("m-b", "b")  # node1
        await c.add_vmim("m-c", "c")  # node2
        await c.add_vmim("m-d", "d", evacuation=True)  # node3, created last, goes first
        names = ["m-c", "m-b", "m-a", "m-d"]  # reconciled in an order unlike the queue's
        for name in names:
            await c.reconcile(name)
            assert await c.phase(name) == MigrationPhase.PENDING
            assert FINALIZER in (await c.vmim(name))["metadata"]["finalizers"]
        for name in names:
            await c.reconcile(name)
        phases = {name: await c.phase(name) for name in names}
        assert phases == {
            "m-d": MigrationPhase.SCHEDULING,  # the evacuation first
            "m-a": MigrationPhase.SCHEDULING,  # then the oldest
            "m-b": MigrationPhase.PENDING,  # node1 already has its one outbound
            "m-c": MigrationPhase.PENDING,  # no cluster slot left
        }
        # m-a ends (canceled): its slot and node1's outbound go to m-b, queued before m-c.
        await c.store.delete(VMIM, NS, "m-a")
        await c.reconcile("m-a")
        with pytest.raises(NotFound):
            await c.vmim("m-a")
        for name in ("m-c", "m-b"):
            await c.reconcile(name)
        assert await c.phase("m-b") == MigrationPhase.SCHEDULING
        assert await c.phase("m-c") == MigrationPhase.PENDING

    run(test, tmp_path)


# -- the hand-off and its token ----------------------------------------------------------


def test_hand_off_is_written_once_when_the_vmim_write_fails(tmp_path: Path) -> None:
    """The bug: a pass wrote the hand-off into the VMI, then failed to write the VMIM's
    phase; the next pass wrote a second hand-off with a new token."""

    async def test(c: Cluster) -> None:
        uid = await c.add_vmim("m", "vm")
        await c.to_phase("m", MigrationPhase.SCHEDULING)
        real_update = c.store.update
        failed: list[str] = []

        async def update_failing_once(obj: Obj, *, subresource: str | None = None) -> Obj:
            if obj["kind"] == VMIM and subresource == "status" and not failed:
                failed.append(obj["metadata"]["name"])
                raise Unavailable("the store went away")
            return await real_update(obj, subresource=subresource)

        c.store.update = update_failing_once  # type: ignore[method-assign]
        with pytest.raises(Unavailable):
            await c.reconcile("m")
        assert failed == ["m"]
        vmi = await c.vmi("vm")
        assert raw(vmi)[Field.MIGRATION_UID] == uid
        assert await c.phase("m") == MigrationPhase.SCHEDULING
        token = await c.token_of(uid)
        handoff_version = vmi["metadata"]["resourceVersion"]

        await c.reconcile("m")
        assert await c.phase("m") == MigrationPhase.SCHEDULED
        vmi = await c.vmi("vm")
        assert vmi["metadata"]["resourceVersion"] == handoff_version, "hand-off rewritten"
        assert raw(vmi)[Field.MIGRATION_UID] == uid
        assert await c.token_of(uid) == token, "a second token was minted"
        assert len(await c.token_secrets()) == 1
        mirrored = raw(await c.vmim("m"))
        assert mirrored[Field.TARGET_NODE] == raw(vmi)[Field.TARGET_NODE]

    run(test, tmp_path)


def test_token_lives_in_a_secret_the_two_nodes_may_read(tmp_path: Path) -> None:
    async def test(c: Cluster) -> None:
        uid = await c.add_vmim("m", "vm")
        await c.to_phase("m", MigrationPhase.RUNNING)
        vmi, vmim = await c.vmi("vm"), await c.vmim("m")
        assert_no_token_in(vmi)
        assert_no_token_in(vmim)
        (secret,) = await c.token_secrets()
        assert secret["metadata"]["name"] == token_secret_name(uid)
        assert len(await c.token_of(uid)) >= 32
        target = raw(vmi)[Field.TARGET_NODE]
        assert target in ("node2", "node3")
        assert migration_token.may_node_read(secret, "node1")  # the source
        assert migration_token.may_node_read(secret, target)
        bystander = ({"node2", "node3"} - {target}).pop()
        assert not migration_token.may_node_read(secret, bystander)
        # ensure_token_secret is idempotent: same token, labels follow a new target.
        again = await migration_token.ensure_token_secret(c.store, uid, "node1", bystander)
        assert again["data"] == secret["data"]
        assert migration_token.may_node_read(again, bystander)
        assert not migration_token.may_node_read(again, target)

    run(test, tmp_path)


def test_mirror_keeps_only_the_contracts_fields() -> None:
    ms = {Field.MIGRATION_UID: "u", "token": "s3cr3t", Field.TRANSFER: {"rounds": 2}}
    mirrored = mirror_of(ms)
    assert mirrored == {Field.MIGRATION_UID: "u", Field.TRANSFER: {"rounds": 2}}
    mirrored[Field.TRANSFER]["rounds"] = 3
    assert ms[Field.TRANSFER] == {"rounds": 2}  # a copy


# -- failure before start ------------------------------------------------------------------


def test_target_not_ready_fails_before_start(tmp_path: Path) -> None:
    async def test(c: Cluster) -> None:
        uid = await c.add_vmim("m", "vm")
        await c.to_phase("m", MigrationPhase.SCHEDULED)
        target = raw(await c.vmi("vm"))[Field.TARGET_NODE]
        await c.set_ready(target, False)
        await c.reconcile("m")
        assert await c.phase("m") == MigrationPhase.FAILED
        ms = raw(await c.vmi("vm"))
        assert ms[Field.FAILED] is True
        assert ms[Field.FAILURE_REASON] == f"target node {target} is not ready"
        assert raw(await c.vmim("m"))[Field.FAILURE_REASON] == ms[Field.FAILURE_REASON]
        assert await c.token_secrets() == []
        with pytest.raises(NotFound):
            await c.token_of(uid)

    run(test, tmp_path)


def test_target_that_never_prepares_times_out_by_the_clock(tmp_path: Path) -> None:
    async def test(c: Cluster) -> None:
        await c.add_vmim("m", "vm")
        await c.to_phase("m", MigrationPhase.SCHEDULED)
        c.clock.advance(TARGET_PREPARE_TIMEOUT - 1)
        await c.reconcile("m")
        assert await c.phase("m") == MigrationPhase.SCHEDULED  # still waiting
        assert len(await c.token_secrets()) == 1
        c.clock.advance(2)
        await c.reconcile("m")
        assert await c.phase("m") == MigrationPhase.FAILED
        vmi_ms = raw(await c.vmi("vm"))
        assert "did not prepare within 60s" in vmi_ms[Field.FAILURE_REASON]
        assert vmi_ms[Field.END_TIMESTAMP]  # stamped by the controller's clock
        assert await c.token_secrets() == []

    run(test, tmp_path)


def test_a_started_source_owns_failure(tmp_path: Path) -> None:
    """Once the source recorded startTimestamp, the prepare timeout no longer applies."""

    async def test(c: Cluster) -> None:
        await c.add_vmim("m", "vm")
        await c.to_phase("m", MigrationPhase.RUNNING)
        c.clock.advance(10 * TARGET_PREPARE_TIMEOUT)
        await c.reconcile("m")
        assert await c.phase("m") == MigrationPhase.RUNNING
        assert not raw(await c.vmi("vm")).get(Field.FAILED)

    run(test, tmp_path)


# -- cancel -----------------------------------------------------------------------------


def test_cancel_before_start_fails_the_hand_off(tmp_path: Path) -> None:
    async def test(c: Cluster) -> None:
        await c.add_vmim("m", "vm")
        await c.to_phase("m", MigrationPhase.PREPARING_TARGET)
        await c.store.delete(VMIM, NS, "m")  # the finalizer keeps it, deletionTimestamp set
        assert (await c.vmim("m"))["metadata"].get("deletionTimestamp")
        await c.reconcile("m")
        ms = raw(await c.vmi("vm"))
        assert ms[Field.FAILED] is True
        assert ms[Field.FAILURE_REASON] == "canceled by the user"
        assert ms[Field.ABORT_STATUS] == AbortStatus.SUCCEEDED
        with pytest.raises(NotFound):  # finished, finalizer removed
            await c.vmim("m")
        assert await c.token_secrets() == []

    run(test, tmp_path)


def test_cancel_while_running_asks_the_source_to_abort(tmp_path: Path) -> None:
    async def test(c: Cluster) -> None:
        await c.add_vmim("m", "vm")
        await c.to_phase("m", MigrationPhase.RUNNING)
        await c.store.delete(VMIM, NS, "m")
        await c.reconcile("m")
        ms = raw(await c.vmi("vm"))
        assert ms[Field.ABORT_REQUESTED] is True
        assert ms[Field.ABORT_STATUS] == AbortStatus.ABORTING
        assert not ms.get(Field.FAILED)  # the source decides how it ends
        vmim = await c.vmim("m")
        assert MigrationPhase.of(vmim) == MigrationPhase.RUNNING
        assert raw(vmim)[Field.ABORT_REQUESTED] is True
        assert len(await c.token_secrets()) == 1  # the source still talks to the target
        await c.reconcile("m")  # idempotent: nothing more to write
        assert raw(await c.vmi("vm")) == ms
        # The source aborts and records it.
        await c.handler_writes(
            "vm",
            **{
                Field.FAILED: True,
                Field.FAILURE_REASON: "aborted on request",
                Field.ABORT_STATUS: AbortStatus.SUCCEEDED,
            },
        )
        await c.reconcile("m")
        with pytest.raises(NotFound):
            await c.vmim("m")
        assert await c.token_secrets() == []

    run(test, tmp_path)


# -- completion ----------------------------------------------------------------------------


def test_completion_is_mirrored_then_finishes(tmp_path: Path) -> None:
    async def test(c: Cluster) -> None:
        await c.add_vmim("m", "vm")
        await c.to_phase("m", MigrationPhase.RUNNING)
        transfer = {"dataTotalBytes": 64 << 20, "dataProcessedBytes": 8 << 20, "rounds": 1}
        await c.handler_writes("vm", **{Field.TRANSFER: transfer})
        await c.reconcile("m")
        assert raw(await c.vmim("m"))[Field.TRANSFER] == transfer
        assert await c.phase("m") == MigrationPhase.RUNNING
        # completed, but the VMI does not run on the target yet: not Succeeded yet
        await c.handler_writes("vm", **{Field.COMPLETED: True})
        await c.reconcile("m")
        assert await c.phase("m") == MigrationPhase.RUNNING
        vmi = await c.vmi("vm")
        vmi["status"]["nodeName"] = raw(vmi)[Field.TARGET_NODE]
        await c.store.update(vmi, subresource="status")
        await c.reconcile("m")
        vmim = await c.vmim("m")
        assert MigrationPhase.of(vmim) == MigrationPhase.SUCCEEDED
        recorded = [s["phase"] for s in vmim["status"]["phaseTransitionTimestamps"]]
        assert recorded == [
            MigrationPhase.PENDING,
            MigrationPhase.SCHEDULING,
            *PROGRESS_PHASES,
            MigrationPhase.SUCCEEDED,
        ]
        assert raw(vmim)[Field.COMPLETED] is True
        assert_no_token_in(vmim)
        assert await c.token_secrets() == []

    run(test, tmp_path)


@pytest.mark.parametrize("runs_on_target", [True, False])
def test_a_hand_off_nobody_completes_is_completed_after_the_grace(
    tmp_path: Path, runs_on_target: bool
) -> None:
    """The source handler died after the hand-off: the guest runs on the target, which
    published it; past HANDOFF_COMPLETION_GRACE the monitor records the completion and
    the VMIM succeeds. A guest not (yet) on the target is left alone."""

    async def test(c: Cluster) -> None:
        await c.add_vmim("m", "vm")
        await c.to_phase("m", MigrationPhase.RUNNING)
        target = raw(await c.vmi("vm"))[Field.TARGET_NODE]
        await c.handler_writes("vm", **{Field.SWITCHOVER: Switchover.COMMITTED})
        if runs_on_target:
            await c.handler_writes(
                "vm", **{Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP: "2026-01-01T00:00:01Z"}
            )
            vmi = await c.vmi("vm")
            vmi["status"]["nodeName"] = target
            await c.store.update(vmi, subresource="status")
        await c.reconcile("m")
        c.clock.advance(HANDOFF_COMPLETION_GRACE - 1)
        await c.reconcile("m")
        assert await c.phase("m") == MigrationPhase.RUNNING
        assert not raw(await c.vmi("vm")).get(Field.COMPLETED)
        c.clock.advance(2)
        await c.reconcile("m")
        await c.reconcile("m")
        if runs_on_target:
            assert raw(await c.vmi("vm"))[Field.COMPLETED] is True
            assert await c.phase("m") == MigrationPhase.SUCCEEDED
        else:
            assert not raw(await c.vmi("vm")).get(Field.COMPLETED)
            assert await c.phase("m") == MigrationPhase.RUNNING

    run(test, tmp_path)


def test_fast_migration_records_the_phases_it_skipped(tmp_path: Path) -> None:
    """A migration that completes between two passes still lists every phase, in order."""

    async def test(c: Cluster) -> None:
        await c.add_vmim("m", "vm")
        await c.to_phase("m", MigrationPhase.SCHEDULED)
        vmi = await c.vmi("vm")
        target = raw(vmi)[Field.TARGET_NODE]
        await c.handler_writes(
            "vm", **{Field.COMPLETED: True, Field.START_TIMESTAMP: "2026-01-01T00:00:00Z"}
        )
        vmi = await c.vmi("vm")
        vmi["status"]["nodeName"] = target
        await c.store.update(vmi, subresource="status")
        await c.reconcile("m")
        vmim = await c.vmim("m")
        recorded = [s["phase"] for s in vmim["status"]["phaseTransitionTimestamps"]]
        assert recorded == [
            MigrationPhase.PENDING,
            MigrationPhase.SCHEDULING,
            *PROGRESS_PHASES,
            MigrationPhase.SUCCEEDED,
        ]

    run(test, tmp_path)


# -- garbage collection ----------------------------------------------------------------------


def test_old_finished_migrations_are_collected_with_their_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Secret of no VMIM is an orphan once it is ORPHAN_MIN_AGE old (younger, it may be a
    # cross-cluster migration's whose receiving VMIM does not name it yet).
    monkeypatch.setattr(migration_token, "ORPHAN_MIN_AGE", 0.0)

    async def test(c: Cluster) -> None:
        old_uids = []
        for i in range(KEEP_FINISHED + 1):
            uid = await c.add_vmim(f"old-{i}", "vm")
            vmim = await c.vmim(f"old-{i}")
            vmim["status"] = {"phase": MigrationPhase.FAILED}
            await c.store.update(vmim, subresource="status")
            old_uids.append(uid)
        # Secrets that survived their migration: a finished one, one whose VMIM is gone.
        await migration_token.ensure_token_secret(c.store, old_uids[0], "node1", "node2")
        await migration_token.ensure_token_secret(c.store, "gone-uid", "node1", "node2")
        # A migration of another VMI in flight: its Secret stays.
        await c.add_vmi("other", "node2")
        live_uid = await c.add_vmim("live", "other")
        await c.to_phase("live", MigrationPhase.SCHEDULED, vmi="other")
        await c.add_vmim("new", "vm")
        await c.reconcile("new")
        await c.store.delete(VMIM, NS, "new")
        await c.reconcile("new")  # finishes (canceled before hand-off) and collects
        items, _ = await c.store.list(VMIM, NS)
        left = sorted(m["metadata"]["name"] for m in items if m["spec"]["vmiName"] == "vm")
        # "new" was deleted on cancel; of the six old ones the five newest stay.
        assert left == [f"old-{i}" for i in range(1, KEEP_FINISHED + 1)]
        [secret] = await c.token_secrets()
        assert secret["metadata"]["name"] == token_secret_name(live_uid)
        assert await c.phase("live") == MigrationPhase.SCHEDULED

    run(test, tmp_path)
