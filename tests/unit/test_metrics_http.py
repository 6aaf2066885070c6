"""/metrics over HTTPS and who may read it: the allowlist of client certificates (every
daemon), the controller's RBAC decision on the non-resource URL /metrics (certificates
and bearer tokens), the configuration errors, and the new KubeVirt series."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge

from controller.metrics import ControllerMetrics, non_evictable, rbac_authorizer
from controller.rbac import Policy, escalation_problem
from controller.rbac_builtin import BUILTIN_CLUSTER_ROLE_BINDINGS, BUILTIN_CLUSTER_ROLES
from vmferry import metrics_http, pki
from vmferry.config import ConfigError
from vmferry.errors import Unauthorized
from vmferry.informer import Informer
from vmferry.metrics_http import MetricsAuth

pytestmark = pytest.mark.timeout(30)
ALL_MODES = tuple(MetricsAuth)
NODE_MODES = (MetricsAuth.NONE, MetricsAuth.ALLOWLIST)


@pytest.fixture(scope="module")
def pkidir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d, "metrics")
    pki.issue_node(d, "node1", ips=["127.0.0.1"])
    pki.issue_user(d, "prometheus", groups=["system:monitoring"])
    pki.issue_user(d, "alice", groups=["developers"])
    return d


def node_tls(d: Path) -> pki.TlsFiles:
    return pki.TlsFiles(d / "ca.crt", d / "nodes" / "node1.crt", d / "nodes" / "node1.key")


def user(d: Path, name: str) -> pki.TlsFiles:
    return pki.TlsFiles(d / "ca.crt", d / "users" / f"{name}.crt", d / "users" / f"{name}.key")


def registry() -> CollectorRegistry:
    r = CollectorRegistry()
    Gauge("vmferry_test_up", "A test series.", registry=r).set(1)
    return r


async def get(
    port: int, ca: Path, client: pki.TlsFiles | None, token: str = ""
) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write(
        f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}\r\n".encode()
    )
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def serve_and_get(
    d: Path, config: dict[str, Any], requests: list[tuple[pki.TlsFiles | None, str]]
) -> list[tuple[int, bytes]]:
    settings = metrics_http.settings(
        {**metrics_http.DEFAULTS, "metrics_listen": "127.0.0.1:0", **config}, NODE_MODES
    )
    assert settings is not None

    async def main() -> list[tuple[int, bytes]]:
        served = await metrics_http.start(
            "node node1", settings, registry(), tls=node_tls(d), ready=lambda: None
        )
        try:
            return [await get(served.port, d / "ca.crt", c, t) for c, t in requests]
        finally:
            await served.close()

    return asyncio.run(main())


def test_https_by_default_and_open_without_auth(pkidir: Path) -> None:
    [(status, body)] = serve_and_get(pkidir, {}, [(None, "")])
    assert status == 200 and b"vmferry_test_up 1.0" in body
    assert b"process_cpu_seconds_total" not in body  # only what the registry holds


def test_allowlist_needs_a_listed_certificate(pkidir: Path) -> None:
    results = serve_and_get(
        pkidir,
        {"metrics_auth": "allowlist"},
        [
            (None, ""),
            (None, "some-token"),
            (user(pkidir, "alice"), ""),
            (user(pkidir, "prometheus"), ""),
        ],
    )
    assert results[0][0] == 401 and b"client certificate" in results[0][1]
    assert results[1][0] == 401 and b"verified by the controller only" in results[1][1]
    assert results[2] == (403, b'Forbidden: User "alice" may not read /metrics\n')
    assert results[3][0] == 200 and b"vmferry_test_up" in results[3][1]


def test_allowlist_by_user_name(pkidir: Path) -> None:
    results = serve_and_get(
        pkidir,
        {"metrics_auth": "allowlist", "metrics_allowed_users": ["alice"]},
        [(user(pkidir, "alice"), "")],
    )
    assert results[0][0] == 200


def test_bad_metrics_settings_are_config_errors() -> None:
    base = {"metrics_listen": "127.0.0.1:9100"}
    assert metrics_http.settings({}, ALL_MODES) is None
    with pytest.raises(ConfigError, match=r"metrics_auth 'open': expected one of none, allowlist$"):
        metrics_http.settings({**base, "metrics_auth": "open"}, NODE_MODES)
    with pytest.raises(ConfigError, match=r"metrics_auth 'rbac': expected one of none, allowlist$"):
        metrics_http.settings({**base, "metrics_auth": "rbac"}, NODE_MODES)
    with pytest.raises(ConfigError, match="needs HTTPS"):
        metrics_http.settings(
            {**base, "metrics_auth": "rbac", "metrics_plain_http": True}, ALL_MODES
        )
    with pytest.raises(ConfigError, match="which --insecure-plaintext turns off"):
        metrics_http.settings(
            {**base, "metrics_auth": "allowlist", "insecure_plaintext": True}, ALL_MODES
        )
    with pytest.raises(ConfigError, match="list metrics_allowed_users"):
        metrics_http.settings(
            {**base, "metrics_auth": "allowlist", "metrics_allowed_groups": []}, ALL_MODES
        )
    with pytest.raises(ConfigError, match="metrics_listen: 'nohost' is not HOST:PORT"):
        metrics_http.settings({"metrics_listen": "nohost"}, ALL_MODES)
    plain = metrics_http.settings({**base, "metrics_plain_http": True}, ALL_MODES)
    assert plain is not None and plain.plain_http


# -- the controller's RBAC decision --------------------------------------------------------------


def policy() -> Policy:
    return Policy.of([*BUILTIN_CLUSTER_ROLES, *BUILTIN_CLUSTER_ROLE_BINDINGS])


def test_rbac_authorizer_certificates_and_tokens(pkidir: Path) -> None:
    async def authenticate_token(token: str) -> pki.Identity:
        if token == "scraper":
            return pki.Identity(
                "system:serviceaccount:monitoring:prometheus", ("system:monitoring",)
            )
        if token == "dev":
            return pki.Identity("system:serviceaccount:default:dev", ("system:serviceaccounts",))
        raise Unauthorized("invalid bearer token: bad signature")

    async def load() -> Policy:
        return policy()

    authorize = rbac_authorizer(authenticate_token, load)

    def der(name: str) -> bytes:
        return ssl.PEM_cert_to_DER_cert((pkidir / "users" / f"{name}.crt").read_text())

    async def main() -> None:
        assert (await authorize(None, "scraper")).allowed
        assert (await authorize(der("prometheus"), None)).allowed
        denied = await authorize(der("alice"), None)
        assert denied.status == 403
        assert denied.reason == 'Forbidden: User "alice" cannot get path "/metrics"'
        assert (await authorize(None, "dev")).status == 403
        bad = await authorize(der("prometheus"), "forged")  # a token wins over a certificate
        assert (bad.status, bad.reason) == (
            401,
            "Unauthorized: invalid bearer token: bad signature",
        )
        assert (await authorize(None, "")).status == 401
        assert (await authorize(None, None)).status == 401

    asyncio.run(main())


def test_non_resource_urls_in_rbac() -> None:
    p = policy()
    admin = p.authorize_non_resource("root", ("system:masters",), "get", "/metrics")
    assert admin.allowed and "cluster-admin" in admin.reason
    assert not p.authorize_non_resource("mon", ("system:monitoring",), "delete", "/metrics").allowed
    assert not p.authorize_non_resource("mon", ("system:monitoring",), "get", "/debug").allowed
    # Escalation: granting /metrics needs holding it.
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "scrape"},
        "rules": [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}],
    }
    assert escalation_problem(p, "root", ["system:masters"], role) is None
    problem = escalation_problem(p, "alice", ["developers"], role)
    assert problem is not None and "NonResourceURLs" in problem


# -- the new KubeVirt series -----------------------------------------------------------------------


class FakeSource:
    async def list(self, kind: str, namespace: str | None) -> tuple[list[Any], str]:
        return [], "1"


def vmi(name: str, strategy: str | None, migratable: str | None) -> dict[str, Any]:
    conds = [{"type": "LiveMigratable", "status": migratable}] if migratable else []
    spec = {"evictionStrategy": strategy} if strategy else {}
    return {
        "metadata": {"namespace": "default", "name": name, "uid": name},
        "spec": spec,
        "status": {"phase": "Running", "nodeName": "node1", "conditions": conds},
    }


def test_non_evictable_and_info_series() -> None:
    assert non_evictable(vmi("a", None, None))  # default LiveMigrate, not known migratable
    assert non_evictable(vmi("b", "LiveMigrate", "False"))
    assert not non_evictable(vmi("c", "LiveMigrate", "True"))
    assert not non_evictable(vmi("d", "None", "False"))
    vmis = Informer(FakeSource(), "VirtualMachineInstance")  # type: ignore[arg-type]
    vmims = Informer(FakeSource(), "VirtualMachineInstanceMigration")  # type: ignore[arg-type]
    for obj in (vmi("a", None, None), vmi("c", "LiveMigrate", "True")):
        vmis.cache[("default", obj["metadata"]["name"])] = obj
    ready = [False]
    m = ControllerMetrics(vmims, vmis, instance="ctl-1", ready=lambda: ready[0])
    r = m.registry
    labels = {"node": "node1", "namespace": "default"}
    assert r.get_sample_value("kubevirt_vmi_non_evictable", {**labels, "name": "a"}) == 1
    assert r.get_sample_value("kubevirt_vmi_non_evictable", {**labels, "name": "c"}) == 0
    info = [s for f in r.collect() if f.name == "kubevirt_vmi_info" for s in f.samples]
    assert {s.labels["name"]: s.labels["evictable"] for s in info} == {"a": "false", "c": "true"}
    assert info[0].labels["phase"] == "running" and info[0].labels["os"] == "<none>"
    assert r.get_sample_value("kubevirt_virt_controller_leading_status", {"pod": "ctl-1"}) == 1
    assert r.get_sample_value("kubevirt_virt_controller_ready_status", {"pod": "ctl-1"}) == 0
    ready[0] = True
    assert r.get_sample_value("kubevirt_virt_controller_ready_status", {"pod": "ctl-1"}) == 1
    assert r.get_sample_value("process_cpu_seconds_total") is not None  # process collector


def test_the_example_configs_enable_https_metrics() -> None:
    from controller.main import parse_args as controller_args
    from handler.main import parse_args as handler_args
    from sync_controller.main import parse_args as sync_args

    examples = Path(__file__).resolve().parents[2] / "deploy" / "examples"
    for parse, name, auth in (
        (controller_args, "controller.toml", MetricsAuth.RBAC),
        (handler_args, "handler.toml", MetricsAuth.ALLOWLIST),
        (sync_args, "sync-controller.toml", MetricsAuth.ALLOWLIST),
    ):
        settings = parse(["--config", str(examples / name)])["metrics"]
        assert settings is not None and not settings.plain_http, name
        assert settings.auth is auth, name


def test_rbac_on_a_bootstrapped_store(pkidir: Path, tmp_path: Path) -> None:
    """The built-in system:monitoring ClusterRole and binding, as stored by bootstrap,
    decide: a monitoring certificate may read /metrics, alice may not, the admin may."""
    from controller.rbac import load_policy
    from controller.rbac_builtin import bootstrap_rbac
    from controller.store import Store

    pki.issue_user(pkidir, "root", groups=["system:masters"])

    async def main() -> list[int]:
        store = await Store.open(tmp_path / "state.db")
        try:
            await bootstrap_rbac(store)

            async def no_tokens(token: str) -> pki.Identity:
                raise Unauthorized("no tokens here")

            authorize = rbac_authorizer(no_tokens, lambda: load_policy(store))

            def der(name: str) -> bytes:
                return ssl.PEM_cert_to_DER_cert((pkidir / "users" / f"{name}.crt").read_text())

            return [(await authorize(der(n), None)).status for n in ("prometheus", "alice", "root")]
        finally:
            await store.close()

    assert asyncio.run(main()) == [200, 403, 200]
