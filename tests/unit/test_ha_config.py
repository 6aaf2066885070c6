"""The controller's store and replication settings: defaults, flags, and every bad
setting refused with a message that names it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller import ha
from controller.main import parse_args
from vmferry.config import ConfigError


def config(**overrides: object) -> dict:
    base = parse_args(["--insecure-plaintext"])
    base.update(overrides)
    return base


def test_sqlite_is_the_default_and_flags_reach_the_config() -> None:
    assert config()["store"] == "sqlite"
    parsed = parse_args(
        [
            "--insecure-plaintext",
            "--store=etcd",
            "--etcd-endpoints=192.0.2.1:2379,192.0.2.2:2379",
            "--etcd-plaintext",
            "--leader-lease-seconds=7",
            "--leader-renew-seconds=2",
            "--replica-id=c1",
        ]
    )
    etcd = ha.etcd_config(parsed)
    assert etcd.endpoints == ("192.0.2.1:2379", "192.0.2.2:2379") and etcd.tls is None
    leader = ha.leader_config(parsed)
    assert (leader.identity, leader.lease_seconds, leader.renew_seconds) == ("c1", 7, 2.0)


def test_etcd_tls_defaults_to_the_controller_identity() -> None:
    etcd = ha.etcd_config(
        config(etcd_endpoints=["192.0.2.1:2379"], ca="ca.crt", cert="c.crt", key="c.key")
    )
    assert etcd.tls is not None and etcd.tls.cert == Path("c.crt")
    etcd = ha.etcd_config(
        config(
            etcd_endpoints="192.0.2.1:2379",
            ca="ca.crt",
            cert="c.crt",
            key="c.key",
            etcd_cert="e.crt",
            etcd_key="e.key",
        )
    )
    assert etcd.tls is not None and (etcd.tls.cert, etcd.tls.ca) == (Path("e.crt"), Path("ca.crt"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"etcd_endpoints": ""}, "needs etcd_endpoints"),
        ({"etcd_endpoints": "192.0.2.1:2379"}, "needs TLS files"),
        ({"etcd_endpoints": "a:1,b:2", "etcd_plaintext": True}, "must be IP addresses"),
        ({"etcd_endpoints": "192.0.2.1", "etcd_plaintext": True}, "not host:port"),
    ],
)
def test_bad_etcd_settings(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ha.etcd_config(config(**overrides))


def test_bad_leader_timings_and_store_name() -> None:
    with pytest.raises(ConfigError, match="at most half"):
        ha.leader_config(config(leader_lease_seconds=4, leader_renew_seconds=3))
    with pytest.raises(ConfigError, match="store must be one of sqlite, etcd"):
        asyncio.run(ha.Replication.open(config(store="zookeeper"), Path("/nonexistent")))
