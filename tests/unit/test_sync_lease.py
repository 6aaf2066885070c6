"""The sync controller's lease and HyperConverged.status.synchronizationAddresses
(sync_controller/lease.py), over StoreApi with a FakeClock; and its configuration."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from sync_controller import main as sync_main
from sync_controller.lease import SyncAnnouncer, default_id, fresh_addresses, lease_name
from sync_controller.link import SyncLink
from sync_controller.peer_cas import PeerCAs
from tests.support.fake_api import FakeClock, StoreApi
from vmferry import pki
from vmferry.config import ConfigError
from vmferry.decentralized import (
    LEASE_SECONDS,
    SYNC_ADDRESS_ANNOTATION,
    SYNC_ADDRESSES_FIELD,
    SYNC_LEASE_PREFIX,
    Role,
)
from vmferry.errors import BadRequest
from vmferry.informer import Informer
from vmferry.objects.kinds import HYPERCONVERGED_NAME, SYSTEM_NAMESPACE

TIMEOUT = 30
START = 1_780_000_000.0  # a wall-clock time (lease times are timestamps)


def run(scenario: Callable[[Path], Awaitable[None]], tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(scenario(tmp_path), TIMEOUT - 5))


async def with_hco(tmp_path: Path) -> StoreApi:
    api = await StoreApi.open(tmp_path)
    await api.create(
        {
            "apiVersion": "hco.kubevirt.io/v1beta1",
            "kind": "HyperConverged",
            "metadata": {"name": HYPERCONVERGED_NAME, "namespace": SYSTEM_NAMESPACE},
            "spec": {},
        }
    )
    return api


async def addresses(api: StoreApi) -> object:
    hco = await api.store.get("HyperConverged", SYSTEM_NAMESPACE, HYPERCONVERGED_NAME)
    return (hco.get("status") or {}).get(SYNC_ADDRESSES_FIELD)


@pytest.mark.timeout(TIMEOUT)
def test_leases_make_the_addresses_and_stale_ones_drop_out(tmp_path: Path) -> None:
    async def scenario(tmp: Path) -> None:
        api = await with_hco(tmp)
        clock = FakeClock(START)
        one = SyncAnnouncer(api, "aaaaa", "10.0.0.10:7445", clock=clock)
        two = SyncAnnouncer(api, "bbbbb", "10.0.0.11:7445", clock=clock)
        try:
            await one.step()
            lease = await api.store.get("Lease", SYSTEM_NAMESPACE, lease_name("aaaaa"))
            assert lease["metadata"]["name"] == f"{SYNC_LEASE_PREFIX}aaaaa"
            assert lease["metadata"]["annotations"][SYNC_ADDRESS_ANNOTATION] == "10.0.0.10:7445"
            assert lease["spec"]["holderIdentity"] == "aaaaa"
            assert lease["spec"]["leaseDurationSeconds"] == LEASE_SECONDS
            assert await addresses(api) == ["10.0.0.10:7445"]

            await two.step()
            assert await addresses(api) == ["10.0.0.10:7445", "10.0.0.11:7445"]
            await one.step()

            # no change: the status is not written again
            before = len(api.writes("HyperConverged"))
            clock.advance(3)
            await one.step()
            await two.step()
            assert len(api.writes("HyperConverged")) == before

            # "two" dies: once its lease is older than LEASE_SECONDS its address goes
            clock.advance(LEASE_SECONDS)
            await one.step()
            assert await addresses(api) == ["10.0.0.10:7445"]

            # a clean stop withdraws the lease and the address at once
            task = asyncio.create_task(one.run(period=0.01))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await addresses(api) == []
            leases, _ = await api.store.list("Lease", SYSTEM_NAMESPACE)
            assert [x["metadata"]["name"] for x in leases] == [lease_name("bbbbb")]
        finally:
            await api.close()

    run(scenario, tmp_path)


@pytest.mark.timeout(TIMEOUT)
def test_an_api_without_leases_or_hyperconverged_is_tolerated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(tmp: Path) -> None:
        api = await StoreApi.open(tmp)  # no HyperConverged
        announcer = SyncAnnouncer(api, "aaaaa", "10.0.0.10:7445", clock=FakeClock(START))
        try:
            api.fail_next = [BadRequest('the server doesn\'t have a resource type "Lease"')]
            assert await announcer.renew() is False
            assert "serves no Lease yet" in caplog.text
            assert await announcer.renew() is True
            assert await announcer.publish_addresses() == ["10.0.0.10:7445"]
            assert "cannot publish synchronizationAddresses" in caplog.text
        finally:
            await api.close()

    run(scenario, tmp_path)


def test_fresh_addresses_ignore_other_leases_and_repeats() -> None:
    def lease(name: str, address: str, renewed: str) -> dict[str, object]:
        return {
            "metadata": {"name": name, "annotations": {SYNC_ADDRESS_ANNOTATION: address}},
            "spec": {"renewTime": renewed, "leaseDurationSeconds": 15},
        }

    now = 1_780_000_010.0  # 2026-05-28T20:26:50Z
    leases = [
        lease(f"{SYNC_LEASE_PREFIX}a", "h:1", "2026-05-28T20:26:45.000000Z"),
        lease(f"{SYNC_LEASE_PREFIX}b", "h:1", "2026-05-28T20:26:49Z"),
        lease(f"{SYNC_LEASE_PREFIX}c", "h:2", "2026-05-28T20:26:30Z"),  # stale
        lease("kube-scheduler", "h:3", "2026-05-28T20:26:49Z"),
    ]
    assert fresh_addresses(leases, now) == ["h:1"]


@pytest.mark.timeout(TIMEOUT)
def test_the_peers_configmap_feeds_the_registered_cas(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "c2", "cluster2")
    ca_pem = (tmp_path / "c2" / "ca.crt").read_text()

    async def scenario(tmp: Path) -> None:
        api = await StoreApi.open(tmp)
        peers = PeerCAs()
        informer = Informer(api, "ConfigMap", namespace=SYSTEM_NAMESPACE)  # type: ignore[arg-type]
        sync_main.watch_peers(informer, peers)
        obj = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "vmferry-peer-clusters", "namespace": SYSTEM_NAMESPACE},
            "data": {"cluster2": ca_pem},
        }
        try:
            informer.apply_event("ADDED", await api.create(obj))
            assert peers.names() == ["cluster2"]
            informer.apply_event(
                "ADDED",
                await api.create({**obj, "metadata": {**obj["metadata"], "name": "other"}}),  # type: ignore[dict-item]
            )
            informer.apply_event(
                "DELETED", await api.delete("ConfigMap", SYSTEM_NAMESPACE, "other")
            )
            assert peers.names() == ["cluster2"]
            informer.apply_event(
                "DELETED", await api.delete("ConfigMap", SYSTEM_NAMESPACE, "vmferry-peer-clusters")
            )
            assert peers.names() == []
        finally:
            await api.close()

    run(scenario, tmp_path)


def test_config(tmp_path: Path) -> None:
    path = tmp_path / "sync.toml"
    path.write_text(
        'cluster_name = "cluster2"\nca = "ca.crt"\ncert = "s.crt"\nkey = "s.key"\n'
        'listen = "0.0.0.0:7445"\nadvertise = "10.0.0.20:7445"\n'
    )
    config = sync_main.parse_args(["--config", str(path)])
    assert config["advertise"] == "10.0.0.20:7445"
    assert config["id"] == default_id("cluster2", "10.0.0.20:7445")
    path.write_text('cluster_name = "c"\ninsecure_plaintext = true\nlisten = "127.0.0.1:9"\n')
    assert sync_main.parse_args(["--config", str(path)])["advertise"] == "127.0.0.1:9"
    path.write_text('insecure_plaintext = true\nlisten = "127.0.0.1:9"\n')
    with pytest.raises(ConfigError, match="cluster_name is required"):
        sync_main.parse_args(["--config", str(path)])
    path.write_text('cluster_name = "c"\ninsecure_plaintext = true\nlisten = "0.0.0.0:7445"\n')
    with pytest.raises(ConfigError, match="peers cannot dial an unspecified address"):
        sync_main.parse_args(["--config", str(path)])
    path.write_text('cluster_name = "c"\ninsecure_plaintext = true\nlisten = "nope"\n')
    with pytest.raises(ConfigError, match="listen 'nope': expected HOST:PORT"):
        sync_main.parse_args(["--config", str(path)])


def test_the_deploy_example_is_a_valid_configuration() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "sync-controller.toml"
    config = sync_main.parse_args(["--config", str(example)])
    assert config["cluster_name"] and config["advertise"]


@pytest.mark.timeout(TIMEOUT)
def test_each_reconciler_gets_its_own_view_of_the_link() -> None:
    link = SyncLink("cluster1", None, PeerCAs())
    sender, receiver = sync_main.make_reconcilers("api", link, "cluster1")  # type: ignore[arg-type]
    assert sender.link is link.view(Role.SENDER)
    assert receiver.link is link.view(Role.RECEIVER)
    assert sender.cluster_name == receiver.cluster_name == "cluster1"
