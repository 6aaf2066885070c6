"""Events (issue 21 part 1): the recorder's deduplication and failure handling, the
controller's expiry, the node authorizer's rule, the migration controller's words and
how ``describe``/``get events`` show them."""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from controller import rbac
from controller.api import NodeAuthorizer
from controller.events import EventExpiry, expired
from controller.migration_events import MigrationEvents
from vmferry import pki
from vmferry.cli import events_view, printers
from vmferry.errors import BadRequest, NotFound, Unavailable
from vmferry.events import EventRecorder, EventType, InvolvedObject, Reason, involves, new_event
from vmferry.migration_state import AbortStatus, Field, MigrationMode, MigrationPhase
from vmferry.objects import kinds, schema

Obj = dict[str, Any]
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def vmi(name: str = "vm1", uid: str = "u1") -> Obj:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": "default", "uid": uid},
    }


class FakeWriter:
    def __init__(self) -> None:
        self.stored: dict[str, Obj] = {}
        self.creates = 0
        self.updates = 0
        self.fail: Exception | None = None
        self.rv = 0

    async def create(self, obj: Obj, /) -> Obj:
        if self.fail:
            raise self.fail
        self.creates += 1
        schema.validate(obj, server_managed=True)  # what the API would refuse
        return self._store(obj)

    async def update(self, obj: Obj, /) -> Obj:
        if self.fail:
            raise self.fail
        name = obj["metadata"]["name"]
        if name not in self.stored:
            raise NotFound(f'events "{name}" not found')
        self.updates += 1
        return self._store(obj)

    def _store(self, obj: Obj) -> Obj:
        self.rv += 1
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = str(self.rv)
        self.stored[stored["metadata"]["name"]] = stored
        return stored


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.mark.timeout(10)
def test_repeats_count_up_one_event_and_new_messages_make_new_ones() -> None:
    async def go() -> FakeWriter:
        writer, clock = FakeWriter(), Clock()
        rec = EventRecorder(writer, "vmferry-handler", "node1", clock=clock)
        rec.warning(vmi(), Reason.SYNC_FAILED, "kernel missing")
        clock.now += 5
        rec.warning(vmi(), Reason.SYNC_FAILED, "kernel missing")
        clock.now += 5
        rec.warning(vmi(), Reason.SYNC_FAILED, "kernel missing")
        rec.warning(vmi(), Reason.SYNC_FAILED, "initrd missing")  # another message
        rec.warning(vmi("vm2", "u2"), Reason.SYNC_FAILED, "kernel missing")  # another object
        await rec.flush()
        await rec.close()
        return writer

    writer = asyncio.run(go())
    assert (writer.creates, writer.updates) == (3, 2)
    repeated = next(e for e in writer.stored.values() if e["count"] == 3)
    assert repeated["firstTimestamp"] == "2027-01-15T08:00:00Z"
    assert repeated["lastTimestamp"] == "2027-01-15T08:00:10Z"
    assert repeated["involvedObject"] == {
        "kind": "VirtualMachineInstance",
        "name": "vm1",
        "namespace": "default",
        "uid": "u1",
        "apiVersion": "kubevirt.io/v1",
    }
    assert repeated["source"] == {"component": "vmferry-handler", "host": "node1"}
    assert repeated["type"] == "Warning" and repeated["reason"] == "SyncFailed"
    assert repeated["metadata"]["namespace"] == "default"
    assert repeated["metadata"]["name"].startswith("vm1.")


@pytest.mark.timeout(10)
def test_an_expired_series_starts_again_and_api_failures_never_reach_the_caller() -> None:
    async def go() -> tuple[FakeWriter, EventRecorder]:
        writer = FakeWriter()
        rec = EventRecorder(writer, "vmferry-controller", clock=Clock())
        rec.normal(vmi(), Reason.STARTED, "VirtualMachineInstance started.")
        await rec.flush()
        writer.stored.clear()  # the controller expired it (TTL)
        rec.normal(vmi(), Reason.STARTED, "VirtualMachineInstance started.")
        await rec.flush()
        assert writer.creates == 2 and next(iter(writer.stored.values()))["count"] == 1
        writer.fail = Unavailable("the controller is unavailable")
        rec.warning(vmi(), Reason.SYNC_FAILED, "x")  # returns at once, never raises
        writer.fail = BadRequest("refused")
        rec.warning(vmi(), Reason.SYNC_FAILED, "y")
        await rec.flush()
        await rec.close()
        return writer, rec

    _, rec = asyncio.run(go())
    assert rec.failed == 2


def test_recording_outside_an_event_loop_is_dropped_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = FakeWriter()
    rec = EventRecorder(writer, "vmferry-controller")
    rec.normal(vmi(), Reason.STARTED, "no loop here")  # a synchronous caller: logged only
    assert writer.creates == 0 and not writer.stored
    assert "event dropped (no event loop)" in caplog.text


def test_a_cluster_scoped_objects_events_live_in_default() -> None:
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1", "uid": "n1"}}
    event = new_event(
        InvolvedObject.of(node),
        EventType.WARNING,
        Reason.NODE_NOT_READY,
        "Node node1 status is now: NodeNotReady",
        component="vmferry-controller",
        host="",
        now=T0,
    )
    assert event["metadata"]["namespace"] == "default"
    assert "namespace" not in event["involvedObject"]
    assert involves(event, node)
    assert not involves(event, {**node, "metadata": {"name": "node1", "uid": "other"}})


class FakeStore:
    def __init__(self, events: list[Obj]) -> None:
        self.events = {e["metadata"]["name"]: e for e in events}
        self.deleted: list[str] = []

    async def list(self, kind: str, namespace: str | None = None) -> tuple[list[Obj], int]:
        assert kind == "Event"
        return list(self.events.values()), 1

    async def delete(self, kind: str, ns: str, name: str, **_: Any) -> Obj:
        self.deleted.append(name)
        return self.events.pop(name)


def _event(name: str, last: str) -> Obj:
    return {"metadata": {"name": name, "namespace": "default"}, "lastTimestamp": last}


def test_expiry_deletes_events_not_seen_for_the_ttl() -> None:
    clock = Clock()
    store = FakeStore(
        [
            _event("old", "2027-01-15T06:59:59Z"),  # 1h 0m 1s before T0
            _event("fresh", "2027-01-15T07:30:00Z"),
        ]
    )
    expiry = EventExpiry(store, 3600, clock=clock)  # type: ignore[arg-type]
    assert asyncio.run(expiry.sweep()) == 1
    assert store.deleted == ["old"]
    assert expiry.interval == 60
    assert not expired(_event("x", "2027-01-15T07:00:00Z"), T0, 3600)
    with pytest.raises(ValueError, match="event TTL must be positive"):
        EventExpiry(store, 0)  # type: ignore[arg-type]


def _node_may(node: str, verb: str, current: Obj | None, new: Obj | None) -> rbac.Decision:
    identity = pki.Identity(f"{pki.NODE_USER_PREFIX}{node}", (pki.NODES_GROUP,))
    request = rbac.request_for(
        identity.user, identity.groups, verb, kinds.by_kind("Event"), "default", "vm1.1"
    )
    return NodeAuthorizer().check(identity, request, current, new)


def test_a_node_records_events_in_its_own_name_only() -> None:
    mine = {"kind": "Event", "source": {"component": "vmferry-handler", "host": "node1"}}
    theirs = {"kind": "Event", "source": {"component": "vmferry-handler", "host": "node2"}}
    assert _node_may("node1", "create", None, mine).allowed
    assert _node_may("node1", "update", mine, mine).allowed
    refused = _node_may("node1", "create", None, theirs)
    assert not refused.allowed and "source.host 'node1'" in refused.reason
    assert not _node_may("node1", "update", theirs, mine).allowed  # another node's series
    assert not _node_may("node1", "delete", mine, None).allowed  # expiry is the controller's
    assert _node_may("node1", "list", None, None).allowed


def _recorded(fn: Any) -> list[Obj]:
    async def go() -> list[Obj]:
        writer = FakeWriter()
        rec = EventRecorder(writer, "vmferry-controller", clock=Clock())
        fn(MigrationEvents(rec))
        await rec.flush()
        return sorted(writer.stored.values(), key=lambda e: e["involvedObject"]["kind"])

    return asyncio.run(go())


def _vmim(**ms: Any) -> Obj:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": "mig1", "namespace": "default", "uid": "m1"},
        "spec": {"vmiName": "vm1"},
        "status": {
            "migrationState": {Field.SOURCE_NODE: "node1", Field.TARGET_NODE: "node2", **ms}
        },
    }


def test_a_failed_migration_is_a_warning_on_the_vmim_and_its_vmi() -> None:
    events = _recorded(
        lambda ev: ev.phase(
            _vmim(), MigrationPhase.FAILED, vmi=vmi(), reason="target node2 is not ready"
        )
    )
    assert [
        (e["involvedObject"]["kind"], e["type"], e["reason"], e["message"]) for e in events
    ] == [
        (
            "VirtualMachineInstance",
            "Warning",
            "FailedMigration",
            "Migration failed: target node2 is not ready (migration mig1)",
        ),
        (
            "VirtualMachineInstanceMigration",
            "Warning",
            "FailedMigration",
            "Migration failed: target node2 is not ready",
        ),
    ]


def test_migration_words_success_abort_throttle_and_post_copy() -> None:
    def run(ev: MigrationEvents) -> None:
        ev.phase(_vmim(), MigrationPhase.SUCCEEDED, vmi=vmi())
        ev.phase(
            _vmim(),
            MigrationPhase.FAILED,
            reason="canceled by the user",
            abort_status=AbortStatus.SUCCEEDED,
        )
        ev.waiting(_vmim(), "2 migrations run in the cluster (parallelMigrationsPerCluster 2)")
        ev.mirrored(
            _vmim(),
            {Field.MODE: MigrationMode.PRE_COPY},
            {Field.MODE: MigrationMode.POST_COPY, Field.TARGET_NODE: "node2"},
        )

    got = {(e["involvedObject"]["kind"], e["reason"]): e["message"] for e in _recorded(run)}
    assert got == {
        (
            "VirtualMachineInstance",
            "Migrated",
        ): "The VirtualMachineInstance migrated to node node2.",
        (
            "VirtualMachineInstanceMigration",
            "SuccessfulMigration",
        ): "Source node reported migration succeeded",
        (
            "VirtualMachineInstanceMigration",
            "SuccessfulAbortMigration",
        ): "Migration aborted: canceled by the user",
        ("VirtualMachineInstanceMigration", "MigrationPending"): (
            "Waiting to start: 2 migrations run in the cluster (parallelMigrationsPerCluster 2)"
        ),
        ("VirtualMachineInstanceMigration", "PostCopySwitch"): (
            "Switched to post-copy: the guest runs on node2; the remaining memory follows on demand"
        ),
    }


NOW = datetime(2027, 1, 15, 8, 0, 0, tzinfo=UTC)


def _shown(reason: str, message: str, first: str, last: str, count: int, **extra: Any) -> Obj:
    return {
        "kind": "Event",
        "metadata": {"name": f"vm1.{reason}", "namespace": "default"},
        "involvedObject": {
            "kind": "VirtualMachineInstance",
            "namespace": "default",
            "name": "vm1",
            "uid": "u1",
        },
        "type": extra.get("type", "Normal"),
        "reason": reason,
        "message": message,
        "count": count,
        "firstTimestamp": first,
        "lastTimestamp": last,
        "source": {
            "component": extra.get("component", "vmferry-handler"),
            "host": extra.get("host", "node1"),
        },
    }


EVENTS = [
    _shown(
        "SyncFailed",
        "failed to start the guest on node node1: /nope does not exist",
        "2027-01-15T07:59:20Z",
        "2027-01-15T07:59:57Z",
        4,
        type="Warning",
    ),
    _shown(
        "Started",
        "VirtualMachineInstance started.",
        "2027-01-15T07:58:00Z",
        "2027-01-15T07:58:00Z",
        1,
    ),
    _shown(
        "Migrated",
        "The VirtualMachineInstance migrated to node node2.",
        "2027-01-15T07:59:59Z",
        "2027-01-15T07:59:59Z",
        1,
        component="vmferry-controller",
        host="",
    ),
]


def test_describe_ends_with_the_events_table_like_kubectl() -> None:
    kind = kinds.by_kind("VirtualMachineInstance")
    text = printers.describe(
        vmi(),
        kind,
        [
            *EVENTS,
            _shown("Other", "x", "", "", 1)
            | {
                "involvedObject": {
                    "kind": "VirtualMachineInstance",
                    "namespace": "default",
                    "name": "vm2",
                }
            },
        ],
        now=NOW,
    )
    assert text.endswith(
        "Events:\n"
        "  Type     Reason      Age               From                    Message\n"
        "  ----     ------      ----              ----                    -------\n"
        "  Normal   Started     2m                vmferry-handler, node1  VirtualMachineInstance started.\n"
        "  Warning  SyncFailed  3s (x4 over 40s)  vmferry-handler, node1  failed to start the guest on node node1: /nope does not exist\n"
        "  Normal   Migrated    1s                vmferry-controller      The VirtualMachineInstance migrated to node node2.\n"
    )
    assert printers.describe(vmi(), kind, [], now=NOW).endswith("Events:  <none>\n")


def test_get_events_columns_like_kubectl() -> None:
    out = printers.print_objects(EVENTS[:2], kinds.resolve("events"), None, now=NOW)
    assert out == (
        "LAST SEEN   TYPE      REASON       OBJECT                       MESSAGE\n"
        "3s          Warning   SyncFailed   virtualmachineinstance/vm1      failed to start the guest on node node1: /nope does not exist\n"
        "2m          Normal    Started      virtualmachineinstance/vm1      VirtualMachineInstance started.\n"
    ).replace("virtualmachineinstance/vm1      ", "virtualmachineinstance/vm1   ")
    wide = printers.print_objects(EVENTS[:1], kinds.resolve("ev"), "wide", now=NOW)
    assert wide.splitlines()[0].split() == [
        "LAST",
        "SEEN",
        "TYPE",
        "REASON",
        "OBJECT",
        "SOURCE",
        "MESSAGE",
        "FIRST",
        "SEEN",
        "COUNT",
        "NAME",
    ]
    assert "vmferry-handler, node1" in wide and "40s" in wide and " 4 " in wide


def test_field_selectors_as_kubectl_reads_them() -> None:
    sel = events_view.parse_field_selector("involvedObject.name=vm1,type!=Normal")
    assert events_view.select(EVENTS, sel) == [EVENTS[0]]
    assert events_view.select(EVENTS, events_view.parse_field_selector("reason==Started")) == [
        EVENTS[1]
    ]
    with pytest.raises(
        BadRequest, match=r'invalid field selector: "involvedObject\.name": expected'
    ):
        events_view.parse_field_selector("involvedObject.name")
    with pytest.raises(BadRequest, match="the field is empty"):
        events_view.parse_field_selector("=vm1")
