"""Leader election on a real one-member etcd (skipped, saying why, without etcd): one
leader at a time, a SIGKILLed leader's successor within the lease, stepping down when
the lease is lost, the Lease record, and bad timings."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller.etcd_client import EtcdClient, EtcdConfig
from controller.leader import LeaderConfig, LeaderConfigError, LeaderElector, LeaseRecord, Role
from controller.store_etcd import open_etcd_store
from vmferry.lab.etcd import EtcdCluster, etcd_binary, missing_reason
from vmferry.objects import kinds

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]
KEY = b"/le/leader/vmferry-controller"


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    if etcd_binary() is None:
        pytest.skip(missing_reason())
    cluster = EtcdCluster.plan(tmp_path_factory.mktemp("etcd"), 1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def until(condition: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


LEADER = textwrap.dedent(
    """
    import asyncio, sys
    from controller.etcd_client import EtcdClient, EtcdConfig
    from controller.leader import LeaderConfig, LeaderElector

    async def main() -> None:
        client = EtcdClient.connect(EtcdConfig((sys.argv[1],)))
        elector = LeaderElector(client, sys.argv[2].encode(), LeaderConfig("a", 2, 0.5))

        async def lead() -> None:
            print("LEADING", flush=True)
            await asyncio.Event().wait()

        await elector.run(lead)

    asyncio.run(main())
    """
)


def test_sigkilled_leader_is_replaced_within_the_lease(etcd: EtcdCluster) -> None:
    key = KEY + b"-kill"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", LEADER, etcd.endpoints[0], key.decode()],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "LEADING"

        async def main() -> float:
            client = EtcdClient.connect(EtcdConfig(etcd.endpoints))
            elector = LeaderElector(client, key, LeaderConfig("b", 2, 0.5))
            leading = asyncio.Event()

            async def lead() -> None:
                leading.set()
                await asyncio.Event().wait()

            task = asyncio.create_task(elector.run(lead))
            try:
                await until(lambda: elector.holder == "a", 5)
                assert not leading.is_set() and elector.role is Role.FOLLOWING
                proc.kill()
                killed = time.monotonic()
                async with asyncio.timeout(10):
                    await leading.wait()
                assert elector.role is Role.LEADING and elector.holder == "b"
                return time.monotonic() - killed
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await client.close()

        took = asyncio.run(main())
        print(f"new leader {took:.2f} s after SIGKILL (lease 2 s)")
        assert took < 2 + 1.5
    finally:
        proc.kill()
        proc.wait()


def test_one_leader_at_a_time_and_stepping_down_on_a_lost_lease(etcd: EtcdCluster) -> None:
    key = KEY + b"-two"

    async def main() -> None:
        client = EtcdClient.connect(EtcdConfig(etcd.endpoints))
        leaders: list[str] = []
        running: set[str] = set()
        electors = [LeaderElector(client, key, LeaderConfig(n, 2, 0.5)) for n in ("x", "y")]

        def work(name: str):  # type: ignore[no-untyped-def]
            async def lead() -> None:
                running.add(name)
                leaders.append(name)
                try:
                    await asyncio.Event().wait()
                finally:
                    running.discard(name)

            return lead

        tasks = [asyncio.create_task(e.run(work(e.config.identity))) for e in electors]
        try:
            await until(lambda: bool(leaders), 5)
            assert len(running) == 1
            assert sorted(e.role.value for e in electors) == ["following", "leading"]
            # Take the lease away behind the leader's back (an operator revoking it): the
            # leader notices at its next renewal, stops its work, and a leader follows.
            lease = (await client.range(key)).kvs[0].lease
            await client.revoke(lease)
            await until(lambda: len(leaders) >= 2, 6)
            await asyncio.sleep(0.6)  # past one renew period: any overlap would show
            assert len(running) == 1
            assert sorted(e.role.value for e in electors) == ["following", "leading"]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()

    asyncio.run(main())


def test_the_leader_is_recorded_as_a_lease_object(etcd: EtcdCluster) -> None:
    async def main() -> None:
        store = await open_etcd_store(EtcdConfig(etcd.endpoints), prefix="/lr")
        try:
            one = LeaseRecord(store, LeaderConfig("replica-1", 5, 1))
            await one.acquired()
            lease = await store.get("Lease", kinds.SYSTEM_NAMESPACE, "vmferry-controller")
            assert lease["spec"]["holderIdentity"] == "replica-1"
            assert lease["spec"]["leaseTransitions"] == 0
            await LeaseRecord(store, LeaderConfig("replica-2", 5, 1)).acquired()
            lease = await store.get("Lease", kinds.SYSTEM_NAMESPACE, "vmferry-controller")
            assert lease["spec"]["holderIdentity"] == "replica-2"
            assert lease["spec"]["leaseTransitions"] == 1
        finally:
            await store.close()

    asyncio.run(main())


def test_bad_timings_are_refused() -> None:
    with pytest.raises(LeaderConfigError, match="at least 2"):
        LeaderConfig("a", 1, 0.5)
    with pytest.raises(LeaderConfigError, match="at most half"):
        LeaderConfig("a", 4, 3)
    with pytest.raises(LeaderConfigError, match="identity"):
        LeaderConfig("", 4, 1)
    assert LeaderConfig("a", 5, 1).renew_deadline == 4
