"""``vmferry adm peer add|list|remove``: the edits of the peers ConfigMap over a real Store
(StoreApi), and every refusal saying which rule failed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from controller.rbac_controller import ROOT_CA_CONFIGMAP, ROOT_CA_KEY
from tests.support.fake_api import StoreApi
from vmferry import pki
from vmferry.cli.peer_cmd import PeerError, add_peer, list_peers, peer_rows, remove_peer
from vmferry.decentralized import PEERS_CONFIGMAP, PEERS_NAMESPACE
from vmferry.errors import Conflict


def _ca(tmp: Path, name: str) -> str:
    pki.init_ca(tmp / name, name)
    return pki.load_ca_pem(tmp / name).decode()


def _run(tmp: Path, body: Callable[[StoreApi], Awaitable[None]]) -> None:
    async def main() -> None:
        api = await StoreApi.open(tmp)
        try:
            await body(api)
        finally:
            await api.close()

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_add_list_remove(tmp_path: Path) -> None:
    ca2, ca3 = _ca(tmp_path, "cluster2"), _ca(tmp_path, "cluster3")

    async def body(api: StoreApi) -> None:
        assert await list_peers(api) == {}
        assert (await add_peer(api, "cluster2", ca2)).startswith(
            "peer cluster2 added (CA CN=cluster2-ca"
        )
        assert api.writes("ConfigMap") == [
            ("create", "ConfigMap", PEERS_NAMESPACE, PEERS_CONFIGMAP)
        ]
        assert (await add_peer(api, "cluster3", ca3)).startswith("peer cluster3 added")
        peers = await list_peers(api)
        assert set(peers) == {"cluster2", "cluster3"}
        assert peers["cluster2"].strip() == ca2.strip()  # the PEM as given
        # the same again: nothing written
        writes = len(api.writes())
        assert "unchanged" in await add_peer(api, "cluster2", ca2)
        assert len(api.writes()) == writes
        rows = peer_rows(peers)
        assert rows[0] == ("NAME", "CA SUBJECT", "NOT AFTER", "SHA256")
        assert [r[:2] for r in rows[1:]] == [
            ("cluster2", "CN=cluster2-ca"),
            ("cluster3", "CN=cluster3-ca"),
        ]
        assert await remove_peer(api, "cluster2") == "peer cluster2 removed"
        assert set(await list_peers(api)) == {"cluster3"}
        with pytest.raises(PeerError, match=r"peer cluster2 is not registered \(peers: cluster3\)"):
            await remove_peer(api, "cluster2")

    _run(tmp_path, body)


@pytest.mark.timeout(20)
def test_refusals_say_which_rule(tmp_path: Path) -> None:
    ca2, ca3, own = _ca(tmp_path, "cluster2"), _ca(tmp_path, "cluster3"), _ca(tmp_path, "own")
    leaf = pki.issue_user(tmp_path / "cluster2", "alice")

    async def body(api: StoreApi) -> None:
        await api.create(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": ROOT_CA_CONFIGMAP, "namespace": PEERS_NAMESPACE},
                "data": {ROOT_CA_KEY: own},
            }
        )
        with pytest.raises(PeerError, match="this cluster's own"):
            await add_peer(api, "cluster9", own)
        with pytest.raises(PeerError, match="is not a CA certificate"):
            await add_peer(api, "cluster2", leaf.cert.read_text())
        with pytest.raises(PeerError, match="expected exactly one PEM certificate"):
            await add_peer(api, "cluster2", "hello")
        with pytest.raises(PeerError, match="expected exactly one PEM certificate"):
            await add_peer(api, "cluster2", ca2 + ca3)
        with pytest.raises(PeerError, match="must be a DNS label"):
            await add_peer(api, "Cluster_2", ca2)
        await add_peer(api, "cluster2", ca2)
        with pytest.raises(PeerError, match="already registered with another CA: pass --overwrite"):
            await add_peer(api, "cluster2", ca3)
        with pytest.raises(PeerError, match="already registered as peer 'cluster2'"):
            await add_peer(api, "cluster4", ca2)
        assert (await add_peer(api, "cluster2", ca3, overwrite=True)).startswith(
            "peer cluster2 replaced (CA CN=cluster3-ca"
        )
        assert (await list_peers(api))["cluster2"].strip() == ca3.strip()

    _run(tmp_path, body)


@pytest.mark.timeout(20)
def test_a_concurrent_edit_is_read_again(tmp_path: Path) -> None:
    ca2, ca3, ca9 = (_ca(tmp_path, n) for n in ("cluster2", "cluster3", "cluster9"))

    async def body(api: StoreApi) -> None:
        await add_peer(api, "cluster2", ca2)
        real_update = api.update
        calls = 0

        async def update_once_conflicting(obj, *, subresource=""):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            if calls == 1:  # someone else adds a peer in between
                current = await api.get("ConfigMap", PEERS_NAMESPACE, PEERS_CONFIGMAP)
                current["data"]["cluster9"] = ca9
                await real_update(current)
                raise Conflict("the object has been modified")
            return await real_update(obj)

        api.update = update_once_conflicting  # type: ignore[method-assign]
        await add_peer(api, "cluster3", ca3)
        assert set(await list_peers(api)) == {"cluster2", "cluster3", "cluster9"}
        assert calls == 2  # the conflicting update, then the retry on a fresh read

    _run(tmp_path, body)
