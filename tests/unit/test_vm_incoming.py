"""The VM manager's target half with fakes (an in-memory API over the real store, a fake
guest): the commit decision resumes exactly once whichever of its three paths brings it
(Commit frame, VMI watch event, reconcile), an abort discards once and never after a
commit, the token comes from the migration's Secret, and after a handler restart an
adopted guest is settled through the arbiter (committed → resume from the restart
record; else destroy; the source side likewise)."""

from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from handler.drivers.base import Drivers
from handler.endpoint import MigrationEndpoint
from handler.migration.incoming import IncomingMigration, IncomingRegistry
from handler.migration.restart_record import RestartRecord, RestartRecords
from handler.migration.target_state import TargetState
from handler.vm_incoming import IncomingGuests, incoming_id
from handler.vm_manager import VMManager
from tests.support.fake_api import StoreApi
from tests.support.fake_handle import FakeHandle
from vmferry.informer import WorkQueue
from vmferry.migration_network import NodeNetworkStatus, nad_key, not_ready_reason
from vmferry.migration_state import (
    TOKEN_SECRET_KEY,
    TOKEN_SECRET_NAMESPACE,
    ConfigKey,
    Field,
    Switchover,
    token_secret_name,
)

Obj = dict[str, Any]
S = TargetState
SOURCE, TARGET = "node1", "node2"
MIG = "mig-00000001"


class FakeDriver:
    name = "fake"

    def __init__(self) -> None:
        self.prepared: list[str] = []
        self.postcopy: list[bool] = []
        self.adopted: list[FakeHandle] = []

    def claims(self, vmi: Obj) -> bool:
        return True

    async def prepare_incoming_vmi(self, vm_id: str, vmi: Obj, *, postcopy: bool) -> FakeHandle:
        self.prepared.append(vm_id)
        self.postcopy.append(postcopy)
        return FakeHandle(vm_id)

    async def adopt_all(self) -> list[FakeHandle]:
        return self.adopted


class FakeInformer:
    def __init__(self) -> None:
        self.cache: dict[tuple[str, str], Obj] = {}

    def add_handler(self, fn: Any) -> None:
        return None

    def get(self, namespace: str, name: str) -> Obj | None:
        return self.cache.get((namespace, name))


def vmi_obj(ms: Obj, node: str = SOURCE) -> Obj:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"namespace": "default", "name": "vm"},
        "spec": {},
        "status": {
            "phase": "Running",
            "nodeName": node,
            "migrationState": {
                Field.MIGRATION_UID: MIG,
                Field.SOURCE_NODE: SOURCE,
                Field.TARGET_NODE: TARGET,
                **ms,
            },
        },
    }


class Target:
    """IncomingGuests over a StoreApi holding one VMI, and one registered migration."""

    def __init__(self, api: StoreApi, records: RestartRecords) -> None:
        self.api = api
        self.driver = FakeDriver()
        self.registry = IncomingRegistry(records, require_peer_identity=False)
        self.handles: dict[str, Any] = {}
        self.spawned: list[asyncio.Task[None]] = []
        self.endpoint = MigrationEndpoint("10.0.0.2", 7444)
        self.guests = IncomingGuests(
            api,  # type: ignore[arg-type]
            TARGET,
            Drivers(self.driver),  # type: ignore[arg-type]
            self.registry,
            WorkQueue(),
            self.handles,
            endpoint=self.endpoint,
            spawn=self.spawn,
        )

    def spawn(self, work: Coroutine[Any, Any, None], what: str) -> None:
        self.spawned.append(asyncio.create_task(work))

    async def settle(self) -> None:
        while self.spawned:
            await self.spawned.pop()

    def register(self, state: TargetState, vmi_uid: str) -> IncomingMigration:
        inc = IncomingMigration(
            namespace="default",
            name="vm",
            vmi_uid=vmi_uid,
            migration_uid=MIG,
            token="t",
            source_node=SOURCE,
            handle=FakeHandle(),
            device_state=b'{"ticks": 1}',
        )
        inc._state = state
        self.registry.expect(inc)
        return inc


def with_api(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test with a fresh StoreApi as its first argument (``api``)."""

    @functools.wraps(test)
    def run(tmp_path: Path, **params: Any) -> None:
        async def main() -> None:
            api = await StoreApi.open(tmp_path)
            try:
                await test(api, tmp_path, **params)
            finally:
                await api.close()

        asyncio.run(main())

    signature = inspect.signature(test)
    run.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for name, p in signature.parameters.items() if name != "api"]
    )
    return run


async def store_vmi(api: StoreApi, ms: Obj, node: str = SOURCE) -> Obj:
    return await api.create(vmi_obj(ms, node))


@pytest.mark.parametrize("path", ["frame", "watch", "reconcile"])
@with_api
async def test_each_path_of_the_commit_resumes_once_and_publishes(
    api: StoreApi, tmp_path: Path, path: str
) -> None:
    records = RestartRecords(tmp_path / "incoming")
    records.write(MIG, RestartRecord("vm", b"{}"))
    target = Target(api, records)
    vmi = await store_vmi(api, {Field.SWITCHOVER: Switchover.COMMITTED})
    inc = target.register(S.VERIFIED, vmi["metadata"]["uid"])
    if path == "frame":
        await target.registry.on_commit(inc)
    elif path == "watch":
        target.guests.on_vmi_event(vmi)
    else:
        await target.guests.reconcile(vmi, vmi["status"]["migrationState"])
    await target.settle()
    handle = inc.handle
    assert isinstance(handle, FakeHandle)
    assert handle.resumed_with == [b'{"ticks": 1}'] and handle.destroyed == 0
    assert inc.state is S.RESUMED and target.handles[inc.vmi_uid] is handle
    assert target.registry.get(MIG) is None and records.read(MIG) is None
    # The other paths now find the decision made.
    await target.registry.on_commit(inc)
    target.guests.on_vmi_event(vmi)
    await target.settle()
    assert handle.resumes == 1
    stored = await api.get("VirtualMachineInstance", "default", "vm")
    assert stored["status"]["nodeName"] == TARGET
    assert stored["status"]["launcher"]["driver"] == "fake"
    ms = stored["status"]["migrationState"]
    assert ms[Field.TRANSFER]["guestDowntimeMilliseconds"] == 1.5
    assert ms[Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP]


@with_api
async def test_the_three_paths_at_once_resume_exactly_once(api: StoreApi, tmp_path: Path) -> None:
    target = Target(api, RestartRecords(tmp_path / "incoming"))
    vmi = await store_vmi(api, {Field.SWITCHOVER: Switchover.COMMITTED})
    inc = target.register(S.VERIFIED, vmi["metadata"]["uid"])
    handle = inc.handle
    assert isinstance(handle, FakeHandle)
    handle.hold = asyncio.Event()  # the first resume is under way while the others come
    target.guests.on_vmi_event(vmi)
    frame = asyncio.create_task(target.registry.on_commit(inc))
    reconcile = asyncio.create_task(target.guests.reconcile(vmi, vmi["status"]["migrationState"]))
    for _ in range(5):
        await asyncio.sleep(0)
    assert inc.state is S.COMMITTED and handle.resumes == 1
    handle.hold.set()
    await asyncio.gather(frame, reconcile)
    await target.settle()
    assert handle.resumes == 1 and inc.state is S.RESUMED


@with_api
async def test_post_copy_commit_resumes_with_the_pages_still_arriving(
    api: StoreApi, tmp_path: Path
) -> None:
    target = Target(api, RestartRecords(tmp_path / "incoming"))
    vmi = await store_vmi(api, {Field.SWITCHOVER: Switchover.COMMITTED})
    inc = target.register(S.POSTCOPY_VERIFIED, vmi["metadata"]["uid"])
    target.guests.on_vmi_event(vmi)
    await target.registry.on_commit(inc)
    await target.settle()
    handle = inc.handle
    assert isinstance(handle, FakeHandle)
    assert handle.postcopy_resumed_with == [b'{"ticks": 1}'] and handle.resumed_with == []
    assert inc.state is S.POSTCOPY_RUNNING
    assert target.registry.get(MIG) is inc  # kept for reconnects until post-copy is done
    await target.registry.on_postcopy_done(inc)
    assert target.registry.get(MIG) is None


@pytest.mark.parametrize("state", [s for s in TargetState if not s.decided])
@with_api
async def test_abort_before_the_decision_discards_once(
    api: StoreApi, tmp_path: Path, state: TargetState
) -> None:
    records = RestartRecords(tmp_path / "incoming")
    records.write(MIG, RestartRecord("vm", b"{}"))
    target = Target(api, records)
    inc = target.register(state, "uid-1")
    await target.registry.on_abort(inc, "the source aborted")
    await target.registry.on_abort(inc, "again")
    handle = inc.handle
    assert isinstance(handle, FakeHandle)
    assert handle.destroyed == 1 and handle.resumes == 0
    assert inc.state is S.ABORTED and target.registry.get(MIG) is None
    assert records.read(MIG) is None


@pytest.mark.parametrize("state", [S.COMMITTED, S.RESUMED, S.POSTCOPY_RUNNING])
@with_api
async def test_abort_after_the_commit_leaves_the_guest(
    api: StoreApi, tmp_path: Path, state: TargetState
) -> None:
    target = Target(api, RestartRecords(tmp_path / "incoming"))
    inc = target.register(state, "uid-1")
    await target.guests.discard(inc, "too late")
    handle = inc.handle
    assert isinstance(handle, FakeHandle)
    assert handle.destroyed == 0 and inc.state is state


@with_api
async def test_an_aborted_hand_off_in_the_vmi_discards_in_the_reconcile(
    api: StoreApi, tmp_path: Path
) -> None:
    target = Target(api, RestartRecords(tmp_path / "incoming"))
    vmi = await store_vmi(api, {Field.SWITCHOVER: Switchover.ABORTED})
    inc = target.register(S.VERIFIED, vmi["metadata"]["uid"])
    await target.guests.reconcile(vmi, vmi["status"]["migrationState"])
    handle = inc.handle
    assert isinstance(handle, FakeHandle)
    assert handle.destroyed == 1 and inc.state is S.ABORTED


# -- preparing: the token from its Secret ------------------------------------------------


@with_api
async def test_prepare_reads_the_token_from_the_secret(api: StoreApi, tmp_path: Path) -> None:
    target = Target(api, RestartRecords(tmp_path / "incoming"))
    await api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"namespace": TOKEN_SECRET_NAMESPACE, "name": token_secret_name(MIG)},
            "data": {TOKEN_SECRET_KEY: base64.b64encode(b"s3cret").decode()},
        }
    )
    vmi = await store_vmi(api, {})
    await target.guests.reconcile(vmi, vmi["status"]["migrationState"])
    inc = target.registry.get(MIG)
    assert inc is not None and inc.token == "s3cret" and inc.state is S.AWAITING_HELLO
    assert target.driver.prepared == [incoming_id(vmi, vmi["status"]["migrationState"])]
    ms = (await api.get("VirtualMachineInstance", "default", "vm"))["status"]["migrationState"]
    assert ms[Field.TARGET_NODE_ADDRESS] == "10.0.0.2" and ms[Field.TARGET_NODE_PORT] == 7444


@pytest.mark.parametrize(
    ("ms", "postcopy"),
    [
        ({}, False),
        ({Field.MIGRATION_CONFIGURATION: {ConfigKey.ALLOW_POST_COPY: True}}, True),
        # never across clusters, whatever the configuration says (as the source decides)
        (
            {
                Field.MIGRATION_CONFIGURATION: {ConfigKey.ALLOW_POST_COPY: True},
                Field.PEER_CLUSTER: "cluster1",
            },
            False,
        ),
    ],
)
@with_api
async def test_prepare_tells_the_driver_whether_post_copy_may_follow(
    api: StoreApi, tmp_path: Path, ms: Obj, postcopy: bool
) -> None:
    """The QEMU driver preallocates a target's RAM only when post-copy cannot follow."""
    target = Target(api, RestartRecords(tmp_path / "incoming"))
    await store_token(api)
    vmi = await store_vmi(api, ms)
    await target.guests.reconcile(vmi, vmi["status"]["migrationState"])
    assert target.driver.postcopy == [postcopy]


async def store_token(api: StoreApi) -> None:
    await api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"namespace": TOKEN_SECRET_NAMESPACE, "name": token_secret_name(MIG)},
            "data": {TOKEN_SECRET_KEY: base64.b64encode(b"s3cret").decode()},
        }
    )


NAD = "migration-net"
ON_NAD: Obj = {Field.MIGRATION_CONFIGURATION: {ConfigKey.NETWORK: NAD}}


@pytest.mark.parametrize(
    "network",
    [
        None,  # no migration network assigned here
        NodeNetworkStatus(nad_key("other"), "eth1", "198.51.100.12", ready=True),
        NodeNetworkStatus(
            nad_key(NAD), "eth1", "", ready=False, message="no network interface eth1 on this node"
        ),
    ],
)
@pytest.mark.timeout(30)
@with_api
async def test_prepare_refuses_a_migration_over_a_network_this_node_does_not_serve(
    api: StoreApi, tmp_path: Path, network: NodeNetworkStatus | None
) -> None:
    target = Target(api, RestartRecords(tmp_path / "incoming"))
    target.endpoint.network = network
    await store_token(api)
    vmi = await store_vmi(api, ON_NAD)
    await target.guests.reconcile(vmi, vmi["status"]["migrationState"])
    assert target.driver.prepared == [] and target.registry.get(MIG) is None
    ms = (await api.get("VirtualMachineInstance", "default", "vm"))["status"]["migrationState"]
    assert ms[Field.FAILED] is True and Field.TARGET_NODE_ADDRESS not in ms
    assert ms[Field.FAILURE_REASON] == not_ready_reason(NAD, TARGET, network)
    assert TARGET in ms[Field.FAILURE_REASON] and nad_key(NAD) in ms[Field.FAILURE_REASON]


@pytest.mark.timeout(30)
@with_api
async def test_prepare_on_the_migration_network_publishes_its_address(
    api: StoreApi, tmp_path: Path
) -> None:
    target = Target(api, RestartRecords(tmp_path / "incoming"))
    target.endpoint.address = "198.51.100.12"  # what the network agent moved it to
    target.endpoint.network = NodeNetworkStatus(nad_key(NAD), "eth1", "198.51.100.12", ready=True)
    await store_token(api)
    vmi = await store_vmi(api, ON_NAD)
    await target.guests.reconcile(vmi, vmi["status"]["migrationState"])
    assert target.registry.get(MIG) is not None
    ms = (await api.get("VirtualMachineInstance", "default", "vm"))["status"]["migrationState"]
    assert ms[Field.TARGET_NODE_ADDRESS] == "198.51.100.12" and not ms.get(Field.FAILED)


@with_api
async def test_prepare_without_the_secret_prepares_nothing_and_says_why(
    api: StoreApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The token Secret goes when the migration ends: a pass that comes after (a stale
    event) prepares nothing, writes nothing and is not an error."""
    target = Target(api, RestartRecords(tmp_path / "incoming"))
    vmi = await store_vmi(api, {})
    with caplog.at_level(logging.INFO):
        await target.guests.reconcile(vmi, vmi["status"]["migrationState"])
    assert f"stream token of migration {MIG} is gone" in caplog.text
    assert target.driver.prepared == [] and target.registry.get(MIG) is None
    after = await api.get(
        "VirtualMachineInstance", vmi["metadata"]["namespace"], vmi["metadata"]["name"]
    )
    assert after["metadata"]["resourceVersion"] == vmi["metadata"]["resourceVersion"]


# -- settling after a restart --------------------------------------------------------------


async def manager(api: StoreApi, tmp_path: Path, node: str, vmi: Obj) -> VMManager:
    informer = FakeInformer()
    informer.cache[("default", "vm")] = vmi
    return VMManager(
        api,  # type: ignore[arg-type]
        node,
        Drivers(FakeDriver()),  # type: ignore[arg-type]
        informer,  # type: ignore[arg-type]
        IncomingRegistry(RestartRecords(tmp_path / "incoming"), require_peer_identity=False),
        tls=None,
        migration_endpoint=MigrationEndpoint("10.0.0.2", 7444),
        state_dir=tmp_path,
    )


@pytest.mark.parametrize("committed", [True, False])
@with_api
async def test_an_adopted_incoming_guest_is_resumed_from_its_record_only_if_committed(
    api: StoreApi, tmp_path: Path, committed: bool
) -> None:
    ms = {Field.SWITCHOVER: Switchover.COMMITTED} if committed else {Field.FAILED: True}
    vmi = await store_vmi(api, ms)
    vm = await manager(api, tmp_path, TARGET, vmi)
    orphan = FakeHandle(incoming_id(vmi, vmi["status"]["migrationState"]))
    vm.target.orphans[orphan.vm_id] = orphan
    vm.incoming.records.write(MIG, RestartRecord(orphan.vm_id, b'{"ticks": 7}'))
    await vm.reconcile(("default", "vm"))
    if committed:
        assert orphan.resumed_with == [b'{"ticks": 7}'] and orphan.destroyed == 0
        assert vm.handles[vmi["metadata"]["uid"]] is orphan
    else:
        assert orphan.resumes == 0 and orphan.destroyed == 1
        assert vmi["metadata"]["uid"] not in vm.handles
    assert vm.incoming.records.read(MIG) is None and not vm.target.orphans


@with_api
async def test_a_committed_hand_off_without_a_record_destroys_the_adopted_guest(
    api: StoreApi, tmp_path: Path
) -> None:
    vmi = await store_vmi(api, {Field.SWITCHOVER: Switchover.COMMITTED})
    vm = await manager(api, tmp_path, TARGET, vmi)
    orphan = FakeHandle(incoming_id(vmi, vmi["status"]["migrationState"]))
    vm.target.orphans[orphan.vm_id] = orphan
    await vm.reconcile(("default", "vm"))
    assert orphan.resumes == 0 and orphan.destroyed == 1


@pytest.mark.parametrize("committed", [True, False])
@with_api
async def test_an_orphaned_source_is_settled_through_the_arbiter(
    api: StoreApi, tmp_path: Path, committed: bool
) -> None:
    ms: Obj = {Field.START_TIMESTAMP: "2026-01-01T00:00:00Z"}
    if committed:
        ms[Field.SWITCHOVER] = Switchover.COMMITTED
    vmi = await store_vmi(api, ms)
    vm = await manager(api, tmp_path, SOURCE, vmi)
    guest = FakeHandle("source-guest")
    vm.handles[vmi["metadata"]["uid"]] = guest
    await vm.reconcile(("default", "vm"))
    stored = (await api.get("VirtualMachineInstance", "default", "vm"))["status"]
    if committed:
        assert guest.destroyed == 1 and guest.resumes == 0
        assert stored["migrationState"][Field.COMPLETED] is True
    else:
        assert guest.resumed_with == [None] and guest.destroyed == 0
        assert stored["migrationState"][Field.SWITCHOVER] == Switchover.ABORTED
        assert stored["migrationState"][Field.FAILED] is True
        assert "restarted" in stored["migrationState"][Field.FAILURE_REASON]
