"""Leader election of replicated controllers on etcd: exactly one replica runs the
reconcilers; every replica serves the API.

The lock is one etcd key (``<prefix>/leader/vmferry-controller``) whose value is the
holder's identity, attached to an etcd lease of ``lease_seconds``. A replica campaigns
with a transaction that creates the key only when it does not exist; the winner runs
``lead()`` and renews the lease every ``renew_seconds``. It steps down -- cancels
``lead()`` before anything else -- when a renewal says the lease is gone, or when no
renewal succeeded for ``lease_seconds - renew_seconds`` (so it stops acting before etcd
can expire the lease and let another replica in). The others watch the key and
campaign when it is deleted (the holder stepped down or its lease expired: a killed
leader's successor starts within ``lease_seconds``).

The holder is visible as the coordination ``Lease`` ``openshift-cnv/vmferry-controller``
(``spec.holderIdentity``, ``acquireTime``, ``renewTime``, ``leaseTransitions``), which
the leader writes through the store (:class:`LeaseRecord`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from controller.etcd_client import Compacted, EtcdClient
from controller.store import Store
from vmferry.errors import ApiError, NotFound, Unavailable
from vmferry.etcdpb import rpc_pb2
from vmferry.objects import kinds

log = logging.getLogger("vmferry.leader")

LEASE_NAME = "vmferry-controller"
_RETRY = 0.5  # seconds between attempts while etcd does not answer


class LeaderConfigError(ValueError):
    """Lease timings that cannot work."""


@dataclass(frozen=True, slots=True)
class LeaderConfig:
    """Who this replica is and the lease timings (seconds)."""

    identity: str
    lease_seconds: int = 5
    renew_seconds: float = 1.0

    def __post_init__(self) -> None:
        if not self.identity:
            raise LeaderConfigError("a replica needs a non-empty identity")
        if self.lease_seconds < 2:
            raise LeaderConfigError(
                f"leader_lease_seconds must be at least 2 (etcd counts whole seconds), "
                f"not {self.lease_seconds}"
            )
        if not 0 < self.renew_seconds <= self.lease_seconds / 2:
            raise LeaderConfigError(
                f"leader_renew_seconds must be above 0 and at most half of "
                f"leader_lease_seconds ({self.lease_seconds}), not {self.renew_seconds}"
            )

    @property
    def renew_deadline(self) -> float:
        """Without a successful renewal for this long, the leader steps down."""
        return self.lease_seconds - self.renew_seconds


class Role(enum.Enum):
    FOLLOWING = "following"
    LEADING = "leading"


class LeaderElector:
    """Campaigns for ``key`` on etcd and runs ``lead()`` while holding it. ``clock``
    (monotonic seconds) is a parameter for tests."""

    def __init__(
        self,
        client: EtcdClient,
        key: bytes,
        config: LeaderConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.key = key
        self.config = config
        self.clock = clock
        self.role = Role.FOLLOWING
        self.holder = ""  # the identity holding the key, as last seen ("" = nobody)
        self.transitions = 0  # times this replica became the leader

    async def run(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Campaign forever; run ``lead()`` whenever this replica leads. Returns only if
        ``lead()`` returns while leading; raises what ``lead()`` raises."""
        while True:
            try:
                lease = await self.client.grant(self.config.lease_seconds)
                if not await self._campaign(lease):
                    with contextlib.suppress(Unavailable):
                        await self.client.revoke(lease)
                    await self._wait_vacant()
                    continue
            except (Unavailable, Compacted) as exc:
                log.warning("leader election: etcd unavailable (%s); retrying", exc)
                await asyncio.sleep(_RETRY)
                continue
            if await self._lead(lease, lead):
                return

    async def _campaign(self, lease: int) -> bool:
        identity = self.config.identity.encode()
        vacant = rpc_pb2.Compare(
            key=self.key,
            target=rpc_pb2.Compare.CREATE,
            result=rpc_pb2.Compare.EQUAL,
            create_revision=0,
        )
        put = rpc_pb2.RequestOp(
            request_put=rpc_pb2.PutRequest(key=self.key, value=identity, lease=lease)
        )
        read = rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=self.key))
        response = await self.client.txn([vacant], [put], [read])
        if response.succeeded:
            self.holder = self.config.identity
            return True
        kvs = response.responses[0].response_range.kvs
        self.holder = kvs[0].value.decode() if kvs else ""
        return False

    async def _wait_vacant(self) -> None:
        """Until the key is deleted (or is found absent)."""
        response = await self.client.range(self.key)
        if not response.kvs:
            return
        self.holder = response.kvs[0].value.decode()
        log.info("following %s", self.holder)
        async for watched in self.client.watch(
            self.key, b"", response.header.revision + 1, prev_kv=False
        ):
            for event in watched.events:
                if event.type == event.DELETE:
                    self.holder = ""
                    return

    async def _lead(self, lease: int, lead: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Hold the lease and run ``lead()``; True when ``lead()`` returned by itself."""
        started = self.clock()
        self.role = Role.LEADING
        self.transitions += 1
        log.info("leading as %s", self.config.identity)
        task = asyncio.create_task(lead(), name="leader-work")
        try:
            return await self._hold(lease, task, started)
        finally:
            self.role = Role.FOLLOWING
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.holder = ""
            with contextlib.suppress(Unavailable):
                await self.client.revoke(lease)  # lets a successor in at once
            log.info("stopped leading")

    async def _hold(self, lease: int, task: asyncio.Task[None], renewed: float) -> bool:
        while True:
            done, _ = await asyncio.wait({task}, timeout=self.config.renew_seconds)
            if done:
                task.result()  # raises what lead() raised
                return True
            try:
                async with asyncio.timeout(self.config.renew_seconds):
                    ttl = await self.client.keepalive(lease)
            except (Unavailable, TimeoutError) as exc:
                if self.clock() - renewed >= self.config.renew_deadline:
                    log.warning(
                        "no lease renewal for %.1f s (%s): stepping down",
                        self.clock() - renewed,
                        exc,
                    )
                    return False
                continue
            if ttl <= 0:
                log.warning("the leader lease expired: stepping down")
                return False
            renewed = self.clock()


def _microtime(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseRecord:
    """The coordination Lease that shows the leader (written only by the leader)."""

    def __init__(self, store: Store, config: LeaderConfig) -> None:
        self.store = store
        self.config = config

    async def acquired(self) -> None:
        now = _microtime(datetime.now(UTC))
        for _ in range(3):
            try:
                current = await self.store.get("Lease", kinds.SYSTEM_NAMESPACE, LEASE_NAME)
            except NotFound:
                current = None
            spec = {
                "holderIdentity": self.config.identity,
                "leaseDurationSeconds": self.config.lease_seconds,
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            }
            try:
                if current is None:
                    await self.store.create(
                        {
                            "apiVersion": kinds.by_kind("Lease").api_version,
                            "kind": "Lease",
                            "metadata": {"name": LEASE_NAME, "namespace": kinds.SYSTEM_NAMESPACE},
                            "spec": spec,
                        }
                    )
                else:
                    before = current.get("spec") or {}
                    spec["leaseTransitions"] = int(before.get("leaseTransitions", 0)) + (
                        before.get("holderIdentity") != self.config.identity
                    )
                    current["spec"] = spec
                    await self.store.update(current)
                return
            except ApiError as exc:
                log.debug("lease record: %s; retrying", exc)
        log.warning("could not record the leader in Lease %s", LEASE_NAME)

    async def renew_forever(self) -> None:
        """Refresh ``renewTime`` every renew period (cancelled when leadership ends)."""
        while True:
            await asyncio.sleep(self.config.renew_seconds)
            try:
                current = await self.store.get("Lease", kinds.SYSTEM_NAMESPACE, LEASE_NAME)
                spec = dict(current.get("spec") or {})
                if spec.get("holderIdentity") != self.config.identity:
                    await self.acquired()
                    continue
                spec["renewTime"] = _microtime(datetime.now(UTC))
                current["spec"] = spec
                await self.store.update(current)
            except ApiError as exc:
                log.debug("lease record renewal: %s", exc)
