"""The controller's store choice and, on etcd, its replication: the settings
(``store``, ``etcd_*``, ``replica_id``, ``leader_*``), opening the store, and running
the reconcilers only while this replica is the elected leader (``controller.leader``).

SQLite (the default) is one controller: it always leads. On etcd any number of
replicas serve the API from their own read cache; one at a time reconciles.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from controller.etcd_client import EtcdClient, EtcdConfig, EtcdConfigError
from controller.leader import LeaderConfig, LeaderConfigError, LeaderElector, LeaseRecord, Role
from controller.store import Store
from controller.store_etcd import DEFAULT_PREFIX, EtcdBackend
from vmferry.config import ConfigError
from vmferry.pki import TlsFiles

log = logging.getLogger("vmferry.controller")

CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "store": str,
    "etcd_endpoints": (str, list),
    "etcd_ca": str,
    "etcd_cert": str,
    "etcd_key": str,
    "etcd_server_name": str,
    "etcd_prefix": str,
    "etcd_plaintext": bool,
    "replica_id": str,
    "leader_lease_seconds": int,
    "leader_renew_seconds": (int, float),
}
DEFAULTS: dict[str, Any] = {
    "store": "sqlite",
    "etcd_endpoints": "",
    "etcd_prefix": DEFAULT_PREFIX,
    "etcd_plaintext": False,
    "leader_lease_seconds": 5,
    "leader_renew_seconds": 1.0,
}
STORES = ("sqlite", "etcd")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", choices=STORES, help="where objects live (default sqlite)")
    p.add_argument(
        "--etcd-endpoints",
        help="etcd members, host:port separated by commas (IP addresses when several)",
    )
    p.add_argument("--etcd-ca", help="CA of the etcd members (default: --ca)")
    p.add_argument("--etcd-cert", help="client certificate for etcd (default: --cert)")
    p.add_argument("--etcd-key", help="its key (default: --key)")
    p.add_argument("--etcd-server-name", help="TLS name in the members' certificates")
    p.add_argument("--etcd-prefix", help=f"key prefix of the objects (default {DEFAULT_PREFIX})")
    p.add_argument(
        "--etcd-plaintext",
        action="store_true",
        default=None,
        help="talk to etcd without TLS (tests only)",
    )
    p.add_argument(
        "--replica-id", help="this replica's name in the leader Lease (default host:listen)"
    )
    p.add_argument("--leader-lease-seconds", type=int, help="leader lease TTL (default 5)")
    p.add_argument(
        "--leader-renew-seconds", type=float, help="leader lease renew period (default 1)"
    )


def _endpoints(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(item).strip() for item in items if str(item).strip())


def etcd_config(config: dict[str, Any]) -> EtcdConfig:
    """The etcd connection of a controller configuration. Raises ConfigError."""
    endpoints = _endpoints(config.get("etcd_endpoints") or "")
    if not endpoints:
        raise ConfigError('store = "etcd" needs etcd_endpoints (host:port, comma-separated)')
    tls = None
    if not config.get("etcd_plaintext"):
        files = [config.get(f"etcd_{k}") or config.get(k) for k in ("ca", "cert", "key")]
        if not all(files):
            raise ConfigError(
                "etcd needs TLS files: etcd_ca/etcd_cert/etcd_key (or ca/cert/key), "
                "or etcd_plaintext for tests"
            )
        tls = TlsFiles(*(Path(str(f)) for f in files))
    etcd = EtcdConfig(endpoints, tls, config.get("etcd_server_name") or "")
    try:
        etcd.target()
    except EtcdConfigError as exc:
        raise ConfigError(str(exc)) from None
    return etcd


def leader_config(config: dict[str, Any]) -> LeaderConfig:
    identity = config.get("replica_id") or f"{socket.gethostname()}:{config['listen']}"
    try:
        return LeaderConfig(
            identity, int(config["leader_lease_seconds"]), float(config["leader_renew_seconds"])
        )
    except LeaderConfigError as exc:
        raise ConfigError(str(exc)) from None


class Replication:
    """What a controller runs with: its store and, on etcd, its leader elector."""

    def __init__(self, store: Store, elector: LeaderElector | None, record: LeaseRecord | None):
        self.store = store
        self.elector = elector
        self.record = record

    @classmethod
    async def open(cls, config: dict[str, Any], data_dir: Path) -> Replication:
        """Open the configured store. Raises ConfigError for bad settings."""
        kind = config.get("store", "sqlite")
        if kind not in STORES:
            raise ConfigError(f"store must be one of {', '.join(STORES)}, not {kind!r}")
        if kind == "sqlite":
            return cls(await Store.open(data_dir / "state.db"), None, None)
        etcd = etcd_config(config)
        leader = leader_config(config)
        prefix = config.get("etcd_prefix") or DEFAULT_PREFIX
        try:
            backend = EtcdBackend(EtcdClient.connect(etcd), prefix)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        store = await Store.on(backend)
        elector = LeaderElector(
            backend.client, f"{prefix}/leader/vmferry-controller".encode(), leader
        )
        log.info(
            "store on etcd %s (prefix %s) as replica %s",
            ",".join(etcd.endpoints),
            prefix,
            leader.identity,
        )
        return cls(store, elector, LeaseRecord(store, leader))

    def leading(self) -> bool:
        """This replica runs the reconcilers now (always on SQLite): the metric
        ``kubevirt_virt_controller_leading_status``."""
        return self.elector is None or self.elector.role is Role.LEADING

    async def lead(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``work()`` (the reconcilers) now (SQLite), or whenever this replica is
        the leader (etcd); cancelled with it when leadership is lost."""
        if self.elector is None or self.record is None:
            await work()
            return
        record = self.record

        async def leading() -> None:
            await record.acquired()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(record.renew_forever())
                tg.create_task(work())

        await self.elector.run(leading)
