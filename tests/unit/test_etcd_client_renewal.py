"""The etcd client (controller/etcd_client.py) moves new calls to a channel with the
renewed certificate once the files change (the controller's own renewal); a half-written
pair keeps the current channel. No etcd needed: channels connect lazily."""

from __future__ import annotations

import asyncio
from pathlib import Path

from controller.etcd_client import EtcdClient, EtcdConfig
from vmferry import pki


def test_new_calls_use_a_channel_with_the_renewed_files(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, "test")
    tls = pki.issue_server(tmp_path, "ctl", ips=["127.0.0.1"])

    async def scenario() -> None:
        client = EtcdClient.connect(EtcdConfig(("127.0.0.1:1",), tls=tls))
        first_kv, first_channel = client.kv, client._channel
        assert client.kv is first_kv and client.watcher is client.watcher  # nothing changed
        old_key = tls.key.read_bytes()
        pki.issue_server(tmp_path, "ctl", ips=["127.0.0.1"])  # renewed...
        new_key = tls.key.read_bytes()
        tls.key.write_bytes(old_key)  # ...but half-written: the new cert, the old key
        assert client.kv is first_kv
        tls.key.write_bytes(new_key)
        assert client.kv is not first_kv and client._channel is not first_channel
        assert len(client._retiring) == 1  # the old channel closes after a grace period
        assert client.lease is client._lease and client.maintenance is client._maintenance
        await client.close()
        assert not client._retiring

    asyncio.run(scenario())


def test_a_plaintext_client_never_reopens(tmp_path: Path) -> None:
    async def scenario() -> None:
        client = EtcdClient.connect(EtcdConfig(("127.0.0.1:1",)))
        kv = client.kv
        assert client.kv is kv and not client._stamp
        await client.close()

    asyncio.run(scenario())
