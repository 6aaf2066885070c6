"""Provider readiness against a real API (gRPC, TLS with its own CA, bearer tokens): a
good token and CA, a wrong CA, a bad token, an address nobody listens on, and the
Secret's rules (12.6.1, 12.6.1.1)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from controller.forklift.provider import (
    READY,
    RETRY_SECONDS,
    ProviderReason,
    ProviderReconciler,
    TokenConnector,
    server_of,
)
from controller.store import Store
from tests.support.fake_api import StoreApi
from tests.support.forklift_clusters import (
    provider,
    provider_secret,
    service_account_token,
    token_cluster,
)
from vmferry import pki
from vmferry.errors import NotFound
from vmferry.lab.ports import free_port
from vmferry.objects import conditions

NS = "openshift-mtv"


async def ready_of(tmp_path: Path, home: StoreApi, name: str) -> dict[str, str]:
    connector = TokenConnector(home, tmp_path / "cas", timeout=5)
    try:
        again = await ProviderReconciler(home, connector).reconcile((NS, name))
    finally:
        await connector.close()
    assert again is not None
    obj = await home.get("Provider", NS, name)
    cond = conditions.get(obj, READY)
    assert cond is not None
    return cond


async def home_cluster(tmp_path: Path) -> StoreApi:
    store = await Store.open(tmp_path / "home.db")
    api = StoreApi(store)
    await api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    return api


@pytest.mark.timeout(60)
def test_provider_ready_wrong_ca_bad_token_unreachable(tmp_path: Path) -> None:
    async def main() -> None:
        home = await home_cluster(tmp_path)
        async with token_cluster(tmp_path, "cluster2") as c2:
            token = await service_account_token(
                c2.store, c2.signer, "mtv", "mtv-provider", mtv_role=True
            )
            # the good one: token and cluster2's root CA
            await home.create(provider_secret("c2", NS, token, c2.ca_pem))
            await home.create(provider("cluster2", NS, c2.url, "c2"))
            cond = await ready_of(tmp_path, home, "cluster2")
            assert cond["status"] == "True", cond
            assert cond["reason"] == ProviderReason.CONNECTED
            assert "system:serviceaccount:mtv:mtv-provider" in cond["message"]
            # a CA that did not sign cluster2's certificate
            other = pki.init_ca(tmp_path / "other", "elsewhere")
            other_pem = (tmp_path / "other" / pki.CA_CERT_FILE).read_bytes()
            assert other
            await home.create(provider_secret("wrong-ca", NS, token, other_pem))
            await home.create(provider("wrong-ca", NS, c2.url, "wrong-ca"))
            cond = await ready_of(tmp_path, home, "wrong-ca")
            assert cond["status"] == "False"
            assert cond["reason"] == ProviderReason.TLS_FAILURE
            assert "elsewhere-ca" in cond["message"], cond["message"]
            # a token cluster2 never issued (or one that was revoked)
            await home.create(provider_secret("bad-token", NS, token[:-4] + "AAAA", c2.ca_pem))
            await home.create(provider("bad-token", NS, c2.url, "bad-token"))
            cond = await ready_of(tmp_path, home, "bad-token")
            assert cond["status"] == "False"
            assert cond["reason"] == ProviderReason.TOKEN_REFUSED
            assert "invalid bearer token" in cond["message"]
            # nobody listens there
            url = f"https://127.0.0.1:{free_port('127.0.0.1')}"
            await home.create(provider_secret("gone", NS, token, c2.ca_pem))
            await home.create(provider("gone", NS, url, "gone"))
            cond = await ready_of(tmp_path, home, "gone")
            assert cond["status"] == "False"
            assert cond["reason"] == ProviderReason.UNREACHABLE
            assert "unreachable" in cond["message"]
            # the token is revoked: deleting its Secret on cluster2 makes the provider not Ready
            await c2.store.delete("Secret", "mtv", "mtv-provider-token")
            cond = await ready_of(tmp_path, home, "cluster2")
            assert cond["status"] == "False"
            assert cond["reason"] == ProviderReason.TOKEN_REFUSED
        await home.close()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_provider_secret_rules_and_the_host_provider(tmp_path: Path) -> None:
    async def main() -> None:
        home = await home_cluster(tmp_path)
        pki.init_ca(tmp_path / "ca", "c2")
        ca = (tmp_path / "ca" / pki.CA_CERT_FILE).read_bytes()
        await home.create(provider("host", NS))
        cond = await ready_of(tmp_path, home, "host")
        assert (cond["status"], cond["reason"]) == ("True", ProviderReason.HOST)
        await home.create(provider("nosecret", NS, "https://127.0.0.1:1", "missing"))
        cond = await ready_of(tmp_path, home, "nosecret")
        assert cond["reason"] == ProviderReason.SECRET_MISSING
        assert 'secret "openshift-mtv/missing"' in cond["message"]
        await home.create(provider_secret("insecure", NS, "t", ca, insecureSkipVerify="true"))
        await home.create(provider("insecure", NS, "https://127.0.0.1:1", "insecure"))
        cond = await ready_of(tmp_path, home, "insecure")
        assert cond["reason"] == ProviderReason.SECRET_INVALID
        assert "insecureSkipVerify is not supported" in cond["message"]
        await home.create(provider_secret("noca", NS, "t", b"not a certificate"))
        await home.create(provider("noca", NS, "https://127.0.0.1:1", "noca"))
        cond = await ready_of(tmp_path, home, "noca")
        assert cond["reason"] == ProviderReason.SECRET_INVALID
        assert "cacert" in cond["message"]
        await home.close()

    asyncio.run(main())


def test_server_of_provider_urls() -> None:
    assert server_of("https://api.cluster2:6443/") == "api.cluster2:6443"
    assert server_of("127.0.0.1:7444") == "127.0.0.1:7444"
    with pytest.raises(Exception, match="is not https://HOST:PORT"):
        server_of("https://api.cluster2/path")


@pytest.mark.timeout(30)
def test_the_controller_loop_checks_providers_and_rechecks_when_the_secret_changes(
    tmp_path: Path,
) -> None:
    """run_forklift over a real store: informers, queues, the token connector."""
    from controller.forklift.run import run_forklift
    from controller.main import bootstrap

    async def condition(store: Store, name: str, status: str) -> dict[str, str]:
        async with asyncio.timeout(15):
            while True:
                with contextlib.suppress(NotFound):
                    cond = conditions.get(await store.get("Provider", NS, name), READY)
                    if cond is not None and cond["status"] == status:
                        return cond
                await asyncio.sleep(0.05)

    async def main() -> None:
        store = await Store.open(tmp_path / "c1.db")
        await bootstrap(store)
        loop = asyncio.create_task(run_forklift(store, tmp_path / "data"))
        try:
            async with token_cluster(tmp_path, "cluster2") as c2:
                token = await service_account_token(
                    c2.store, c2.signer, "mtv", "mtv-provider", mtv_role=True
                )
                await store.create(provider("host", NS))
                await store.create(provider("cluster2", NS, c2.url, "c2"))  # no Secret yet
                cond = await condition(store, "cluster2", "False")
                assert cond["reason"] == ProviderReason.SECRET_MISSING
                await store.create(provider_secret("c2", NS, token, c2.ca_pem))
                started = asyncio.get_running_loop().time()
                cond = await condition(store, "cluster2", "True")
                # the Secret's creation re-checked it, not the retry RETRY_SECONDS later
                assert asyncio.get_running_loop().time() - started < RETRY_SECONDS / 2
                assert "system:serviceaccount:mtv:mtv-provider" in cond["message"]
                assert (await condition(store, "host", "True"))["reason"] == ProviderReason.HOST
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
            await store.close()

    asyncio.run(main())
