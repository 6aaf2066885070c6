"""The arbiter (``HandoffRecord.claim``/``commit``) over the real store: exactly one
decision stands whoever races for it; a stale copy costs a Conflict and a retry, an API
that is away is retried, a VMI that is gone (or taken by another migration) counts as
Aborted. And ``read_token``: the stream token from its Secret."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from handler.migration import handoff
from handler.migration.handoff import HandoffRecord, MigrationFailed, read_token
from tests.support.fake_api import StoreApi
from vmferry.errors import ApiError
from vmferry.migration_state import (
    TOKEN_SECRET_KEY,
    TOKEN_SECRET_NAMESPACE,
    Field,
    Switchover,
    token_secret_name,
)

MIG = "mig-1"


def run(tmp_path: Path, test: Callable[[StoreApi], Awaitable[None]]) -> None:
    async def main() -> None:
        api = await StoreApi.open(tmp_path)
        try:
            await api.create(
                {
                    "apiVersion": "kubevirt.io/v1",
                    "kind": "VirtualMachineInstance",
                    "metadata": {"namespace": "default", "name": "vm"},
                    "status": {"migrationState": {Field.MIGRATION_UID: MIG}},
                }
            )
            await test(api)
        finally:
            await api.close()

    asyncio.run(main())


def record(api: StoreApi, uid: str = MIG) -> HandoffRecord:
    return HandoffRecord(api, "default", "vm", uid)  # type: ignore[arg-type]


async def stored_ms(api: StoreApi) -> dict[str, Any]:
    vmi = await api.get("VirtualMachineInstance", "default", "vm")
    ms: dict[str, Any] = vmi["status"]["migrationState"]
    return ms


@pytest.mark.parametrize("first", [Switchover.COMMITTED, Switchover.ABORTED])
def test_the_first_decision_stands(tmp_path: Path, first: Switchover) -> None:
    other = Switchover.ABORTED if first is Switchover.COMMITTED else Switchover.COMMITTED

    async def test(api: StoreApi) -> None:
        assert await record(api).claim(first) == first
        assert await record(api).claim(other) == first
        assert (await stored_ms(api))[Field.SWITCHOVER] == first

    run(tmp_path, test)


def test_racing_claims_record_exactly_one_decision(tmp_path: Path) -> None:
    async def test(api: StoreApi) -> None:
        source, target = record(api), record(api)
        # Both read the same VMI first: one update wins, the other gets a Conflict.
        await source.read()
        await target.read()
        results = await asyncio.gather(
            source.claim(Switchover.COMMITTED), target.claim(Switchover.ABORTED)
        )
        standing = (await stored_ms(api))[Field.SWITCHOVER]
        assert results == [standing, standing]

    run(tmp_path, test)


def test_a_stale_copy_costs_a_conflict_and_a_retry(tmp_path: Path) -> None:
    async def test(api: StoreApi) -> None:
        rec = record(api)
        await rec.read()  # cached
        await record(api).patch({Field.TARGET_NODE_ADDRESS: "10.0.0.2"})  # now stale
        api.calls.clear()
        assert await rec.claim(Switchover.COMMITTED, {Field.MODE: "PreCopy"}) == "Committed"
        verbs = [c[0] for c in api.calls]
        assert verbs == ["update", "get", "update"]  # the stale update, the read, the write
        ms = await stored_ms(api)
        assert ms[Field.TARGET_NODE_ADDRESS] == "10.0.0.2" and ms[Field.MODE] == "PreCopy"

    run(tmp_path, test)


def test_an_api_that_is_away_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handoff, "RETRY", 0.001)

    async def test(api: StoreApi) -> None:
        api.fail_next = [ApiError("unavailable"), ApiError("unavailable")]
        assert await record(api).claim(Switchover.COMMITTED) == Switchover.COMMITTED
        assert not api.fail_next
        assert (await stored_ms(api))[Field.SWITCHOVER] == Switchover.COMMITTED

    run(tmp_path, test)


def test_a_vmi_that_is_gone_or_replaced_counts_as_aborted(tmp_path: Path) -> None:
    async def test(api: StoreApi) -> None:
        assert await record(api, "another-migration").claim(Switchover.COMMITTED) == "Aborted"
        assert Field.SWITCHOVER not in await stored_ms(api)
        await api.delete("VirtualMachineInstance", "default", "vm")
        assert await record(api).claim(Switchover.COMMITTED) == Switchover.ABORTED

    run(tmp_path, test)


def test_commit_raises_when_aborted_stands(tmp_path: Path) -> None:
    async def test(api: StoreApi) -> None:
        await record(api).claim(Switchover.ABORTED)
        with pytest.raises(MigrationFailed, match="the hand-off was aborted"):
            await record(api).commit()

    run(tmp_path, test)


def test_commit_records_the_mode(tmp_path: Path) -> None:
    async def test(api: StoreApi) -> None:
        await record(api).commit("PostCopy")
        ms = await stored_ms(api)
        assert ms[Field.SWITCHOVER] == Switchover.COMMITTED and ms[Field.MODE] == "PostCopy"

    run(tmp_path, test)


def test_read_token(tmp_path: Path) -> None:
    async def test(api: StoreApi) -> None:
        with pytest.raises(MigrationFailed, match="not found"):
            await read_token(api, MIG)  # type: ignore[arg-type]
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"namespace": TOKEN_SECRET_NAMESPACE, "name": token_secret_name(MIG)},
            "data": {TOKEN_SECRET_KEY: "not base64!"},
        }
        stored = await api.create(secret)
        with pytest.raises(MigrationFailed, match="holds no stream token"):
            await read_token(api, MIG)  # type: ignore[arg-type]
        stored["data"] = {TOKEN_SECRET_KEY: base64.b64encode(b"abc-123").decode()}
        await api.update(stored)
        assert await read_token(api, MIG) == "abc-123"  # type: ignore[arg-type]

    run(tmp_path, test)


def test_a_late_write_of_an_ended_migration_never_lands_in_the_next_ones_state(
    tmp_path: Path,
) -> None:
    """Seen in the chaos suite: a correction written from a stale copy marked the next
    migration of the same VMI completed before it started."""

    async def test(api: StoreApi) -> None:
        old = record(api)
        assert await old.patch({Field.MODE: "PreCopy"})  # caches a copy of MIG's record
        await api.patch(
            "VirtualMachineInstance",
            "default",
            "vm",
            {"status": {"migrationState": {Field.MIGRATION_UID: "mig-2"}}},
            subresource="status",
        )
        assert not await old.patch({Field.COMPLETED: True})
        await old.patch_until_written({Field.COMPLETED: True, Field.END_TIMESTAMP: "now"})
        ms = await stored_ms(api)
        assert ms[Field.MIGRATION_UID] == "mig-2"
        assert Field.COMPLETED not in ms and Field.END_TIMESTAMP not in ms

    run(tmp_path, test)


def test_a_patch_from_a_stale_copy_rereads_and_lands(tmp_path: Path) -> None:
    async def test(api: StoreApi) -> None:
        mine = record(api)
        assert await mine.patch({Field.MODE: "PreCopy"})
        # another writer (the target) changes the VMI: the cached copy is stale now
        await api.patch(
            "VirtualMachineInstance",
            "default",
            "vm",
            {"status": {"nodeName": "node2"}},
            subresource="status",
        )
        assert await mine.patch({Field.COMPLETED: True})
        ms = await stored_ms(api)
        assert ms[Field.COMPLETED] is True and ms[Field.MODE] == "PreCopy"

    run(tmp_path, test)
