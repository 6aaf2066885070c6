"""RBAC, service-account tokens and the audit log against the real lab (issue 5).

The reference's procedures run as written with ``vmferry`` for ``oc``: 12.1.3 (temporary
``kubevirt.io:upgrademigrate`` role, bindings, delete), 12.1.4 (``label --overwrite``
aggregating ``kubevirt.io:migrate`` into ``admin``), 12.6.1 (``kube-root-ca.crt``) and
12.6.1.1 (long-lived service-account token used as a bearer token). "May migrate" is
checked with a server-side dry-run create of a VirtualMachineInstanceMigration: it is
authorized and admitted exactly like a real one but stores nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.lab import LabHarness, migration_name, vm_manifest
from vmferry import pki
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.errors import ApiError, Forbidden, Unauthorized
from vmferry.migration_state import TOKEN_SECRET_KEY, TOKEN_SECRET_NAMESPACE, token_secret_name
from vmferry.rpc import api_pb2, api_pb2_grpc

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "rbac"
NS = "ns1"
VM = "rbac-vm"
DENIED_IN_NS1 = (
    'User "{user}" cannot create resource "virtualmachineinstancemigrations" '
    'in API group "kubevirt.io" in the namespace "ns1"'
)


def _server(lab: LabHarness) -> str:
    return ClientConfig.load(lab.root / "client.yaml").server


def user_config(lab: LabHarness, name: str, *groups: str, **validity: datetime) -> Path:
    """Issue a user certificate from the lab's CA and write a client config for it."""
    window = (validity["not_before"], validity["not_after"]) if validity else None
    tls = pki.issue_user(lab.lab.pki_dir, name, groups=list(groups), validity=window)
    path = lab.root / f"{name}.yaml"
    path.write_text(
        f"server: {_server(lab)}\ncertificateAuthority: {tls.ca}\n"
        f"clientCertificate: {tls.cert}\nclientKey: {tls.key}\nnamespace: {NS}\n"
    )
    return path


def node_config(lab: LabHarness, node: str) -> Path:
    pki_dir = lab.lab.pki_dir
    path = lab.root / f"{node}-identity.yaml"
    path.write_text(
        f"server: {_server(lab)}\ncertificateAuthority: {pki_dir / 'ca.crt'}\n"
        f"clientCertificate: {pki_dir / 'nodes' / f'{node}.crt'}\n"
        f"clientKey: {pki_dir / 'nodes' / f'{node}.key'}\n"
    )
    return path


def token_config(lab: LabHarness, token: str, name: str = "token") -> Path:
    """Token only, no client certificate, against the controller's token listener."""
    port = json.loads((lab.lab.dir / "lab.json").read_text())["tokenPort"]
    path = lab.root / f"{name}.yaml"
    path.write_text(
        f"server: 127.0.0.1:{port}\ncertificateAuthority: {lab.lab.pki_dir / 'ca.crt'}\n"
        f"token: {token}\nnamespace: {NS}\n"
    )
    return path


def call(config: Path, fn: Any) -> Any:
    async def go() -> Any:
        async with ApiClient(ClientConfig.load(config), timeout=10) as api:
            return await fn(api)

    return asyncio.run(go())


def migrate_dry_run(config: Path, ns: str = NS) -> str:
    """ "allowed", or the error message of a dry-run VMIM create as ``config``'s user."""
    vmim = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"generateName": "rbac-check-", "namespace": ns},
        "spec": {"vmiName": VM},
    }
    try:
        call(config, lambda api: api.create(vmim, dry_run=True))
    except Forbidden as e:
        return e.message
    except ApiError as e:  # authorized, then refused by admission (e.g. no such VMI)
        assert "forbidden" not in e.message
    return "allowed"


def wait_migrate(lab: LabHarness, config: Path, allowed: bool) -> None:
    lab.wait_for(
        f"{config.stem} {'allowed' if allowed else 'denied'} to migrate",
        lambda: (migrate_dry_run(config) == "allowed") == allowed,
        timeout=15,
        interval=0.1,
    )


def audit_entries(lab: LabHarness) -> list[dict[str, Any]]:
    lines = (lab.lab.dir / "controller" / "audit.log").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def cluster(lab: LabHarness) -> Iterator[LabHarness]:
    """ns1 with a running VM, and alice as ns1's namespace admin (RoleBinding to admin)."""
    lab.apply(json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}))
    lab.cli("apply", "-n", NS, "-f", "-", input=vm_manifest(VM, memory="64Mi", hot_set="8Mi"))
    lab.cli("create", "-f", str(EXAMPLES / "namespace-admin-rolebinding.yaml"))
    lab.wait_for(
        "the VM running",
        lambda: ((lab.try_get("vmi", VM, NS) or {}).get("status") or {}).get("phase") == "Running",
        timeout=60,
    )
    yield lab


@pytest.mark.timeout(90)
def test_12_1_3_temporary_role_bindings_then_delete(cluster: LabHarness) -> None:
    lab = cluster
    alice = user_config(lab, "alice")
    bob, carol = user_config(lab, "bob"), user_config(lab, "carol")
    erin = user_config(lab, "erin", "migrators")
    dave = user_config(lab, "dave")

    # 4.19+: a namespace admin cannot migrate; the denial names the missing permission.
    assert DENIED_IN_NS1.format(user="alice") in migrate_dry_run(alice)
    assert "kubevirt.io:migrate" in migrate_dry_run(alice), "the denial says what to ask for"
    assert migrate_dry_run(bob) != "allowed"

    # The temporary role aggregated into admin restores the old behaviour.
    out = lab.cli("apply", "-f", str(EXAMPLES / "upgrademigrate-clusterrole.yaml"))
    assert "clusterrole.rbac.authorization.k8s.io/kubevirt.io:upgrademigrate" in out.stdout
    wait_migrate(lab, alice, allowed=True)
    admin_role = lab.get("clusterrole", "admin")
    assert any(
        "virtualmachineinstancemigrations" in r["resources"] and "create" in r["verbs"]
        for r in admin_role["rules"]
    )

    # Bind kubevirt.io:migrate at namespace and cluster level, exactly as 12.1.3 writes it.
    out = lab.cli(
        "create",
        "-n",
        NS,
        "rolebinding",
        "kvmigrate",
        "--clusterrole=kubevirt.io:migrate",
        "--user=bob",
        "--user=carol",
        "--group=migrators",
    )
    assert out.stdout.strip() == "rolebinding.rbac.authorization.k8s.io/kvmigrate created"
    lab.cli(
        "create",
        "clusterrolebinding",
        "kvmigrate",
        "--clusterrole=kubevirt.io:migrate",
        "--user=dave",
    )
    wide = lab.cli("get", "rolebinding", "kvmigrate", "-n", NS, "-o", "wide").stdout
    assert (
        "ClusterRole/kubevirt.io:migrate" in wide and "bob, carol" in wide and "migrators" in wide
    )

    out = lab.cli("delete", "clusterrole", "kubevirt.io:upgrademigrate")
    assert "deleted" in out.stdout
    wait_migrate(lab, alice, allowed=False)  # the namespace admin lost it ...
    for who in (bob, carol, erin, dave):  # ... the bound users kept it
        assert migrate_dry_run(who) == "allowed", who.stem
    # The RoleBinding grants only in its namespace; the ClusterRoleBinding everywhere.
    assert "cannot create" in migrate_dry_run(bob, ns="default")
    assert "cannot create" not in migrate_dry_run(dave, ns="default")

    # Deleting the binding takes the permission away again.
    lab.cli("delete", "rolebinding", "kvmigrate", "-n", NS)
    assert DENIED_IN_NS1.format(user="bob") in migrate_dry_run(bob)
    lab.cli("delete", "clusterrolebinding", "kvmigrate")
    assert DENIED_IN_NS1.format(user="dave") in migrate_dry_run(dave)


@pytest.mark.timeout(60)
def test_12_1_4_aggregate_migrate_into_admin(cluster: LabHarness) -> None:
    lab = cluster
    alice = user_config(lab, "alice")
    wait_migrate(lab, alice, allowed=False)
    lab.cli(
        "label",
        "--overwrite",
        "clusterrole",
        "kubevirt.io:migrate",
        "rbac.authorization.k8s.io/aggregate-to-admin=true",
    )
    wait_migrate(lab, alice, allowed=True)
    # A real migration by the namespace admin, through `vmferry migrate`.
    out = lab.cli("migrate", VM, "-n", NS, "--config", str(alice))
    assert "was scheduled to migrate" in out.stdout
    vmims = json.loads(lab.cli("get", "vmim", "-n", NS, "-o", "json").stdout)["items"]
    assert vmims, "the migration was created"
    name = vmims[-1]["metadata"]["name"]

    def phase() -> str | None:
        return ((lab.try_get("vmim", name, NS) or {}).get("status") or {}).get("phase")

    lab.wait_for("the migration to finish", lambda: phase() in ("Succeeded", "Failed"))
    assert phase() == "Succeeded"
    lab.cli(
        "label",
        "clusterrole",
        "kubevirt.io:migrate",
        "rbac.authorization.k8s.io/aggregate-to-admin-",
    )
    wait_migrate(lab, alice, allowed=False)


@pytest.mark.timeout(90)
def test_12_6_1_service_account_token_and_root_ca(cluster: LabHarness) -> None:
    lab = cluster
    # 12.6.1: the root CA in every namespace, read as the reference reads it.
    ca = lab.cli("get", "cm", "kube-root-ca.crt", r"-o=jsonpath={.data.ca\.crt}").stdout
    assert ca.strip() == (lab.lab.pki_dir / "ca.crt").read_text().strip()
    lab.wait_for("kube-root-ca.crt in ns1", lambda: lab.try_get("cm", "kube-root-ca.crt", NS))

    # 12.6.1.1, step by step.
    lab.apply(json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mtv"}}))
    lab.cli("create", "-f", str(EXAMPLES / "mtv-clusterrole.yaml"))
    out = lab.cli("create", "serviceaccount", "mtv-provider", "-n", "mtv")
    assert out.stdout.strip() == "serviceaccount/mtv-provider created"
    lab.cli(
        "create",
        "clusterrolebinding",
        "mtv-provider",
        "--clusterrole=live-migration-role",
        "--serviceaccount=mtv:mtv-provider",
    )
    lab.cli("apply", "-f", str(EXAMPLES / "mtv-serviceaccount-token-secret.yaml"))

    def token_b64() -> str:
        proc = lab.cli("get", "secret", "mtv-token", "-n", "mtv", "-o", "jsonpath={.data.token}")
        return proc.stdout.strip()

    encoded = lab.wait_for("the token in the secret", token_b64, timeout=15)
    decoded = subprocess.run(
        ["base64", "--decode"], input=encoded, capture_output=True, text=True, check=True
    ).stdout
    token = token_config(lab, decoded, "mtv")

    # A token-only client (no client certificate) is the service account.
    who = lab.cli("whoami", "--config", str(token)).stdout
    assert "system:serviceaccount:mtv:mtv-provider" in who and "system:serviceaccounts:mtv" in who
    vms = lab.cli("get", "vm", "-n", NS, "--config", str(token)).stdout
    assert VM in vms
    denied = lab.cli("get", "nodes", "--config", str(token), check=False)
    assert denied.returncode == 1
    assert (
        'User "system:serviceaccount:mtv:mtv-provider" cannot list resource "nodes"'
        in denied.stderr
    )

    # Hostile: a forged token (payload edited, signature kept) and a made-up one.
    head, body, sig = decoded.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "==="))
    claims["kubernetes.io/serviceaccount/service-account.name"] = "admin"
    forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    for bad in (f"{head}.{forged_body}.{sig}", "not-a-token"):
        with pytest.raises(Unauthorized):
            call(token_config(lab, bad, "forged"), lambda api: api.whoami())

    # Deleting the secret revokes the token at once; a new secret gets a new token.
    lab.cli("delete", "secret", "mtv-token", "-n", "mtv")
    with pytest.raises(Unauthorized, match="deleted"):
        call(token, lambda api: api.list("VirtualMachine", NS))
    lab.cli("apply", "-f", str(EXAMPLES / "mtv-serviceaccount-token-secret.yaml"))
    encoded2 = lab.wait_for("a new token", token_b64, timeout=15)
    assert encoded2 != encoded
    token2 = token_config(lab, base64.b64decode(encoded2).decode(), "mtv2")
    assert call(token2, lambda api: api.whoami())[0] == "system:serviceaccount:mtv:mtv-provider"

    # Deleting the account revokes its token too (and its token secrets go with it).
    lab.cli("delete", "serviceaccount", "mtv-provider", "-n", "mtv")
    with pytest.raises(Unauthorized):
        call(token2, lambda api: api.whoami())
    lab.wait_for(
        "the token secret removed",
        lambda: lab.try_get("secret", "mtv-token", "mtv") is None,
        timeout=15,
    )


@pytest.mark.timeout(60)
def test_escalation_and_expired_certificate_are_refused(cluster: LabHarness) -> None:
    lab = cluster
    alice = user_config(lab, "alice")
    # A namespace admin may bind what she holds (view) in her namespace ...
    lab.cli(
        "create",
        "-n",
        NS,
        "rolebinding",
        "viewers",
        "--clusterrole=view",
        "--user=frank",
        "--config",
        str(alice),
    )
    # ... but not cluster-admin, nor kubevirt.io:migrate to herself, nor anything cluster-wide.
    for args in (
        [
            "create",
            "-n",
            NS,
            "rolebinding",
            "me-root",
            "--clusterrole=cluster-admin",
            "--user=alice",
        ],
        [
            "create",
            "-n",
            NS,
            "rolebinding",
            "me-migrate",
            "--clusterrole=kubevirt.io:migrate",
            "--user=alice",
        ],
    ):
        out = lab.cli(*args, "--config", str(alice), check=False)
        assert out.returncode == 1
        assert (
            "Forbidden" in out.stderr
            and "attempting to grant RBAC permissions not currently held" in out.stderr
        )
    out = lab.cli(
        "create",
        "clusterrolebinding",
        "me-root",
        "--clusterrole=cluster-admin",
        "--user=alice",
        "--config",
        str(alice),
        check=False,
    )
    assert out.returncode == 1
    assert (
        'User "alice" cannot create resource "clusterrolebindings" in API group '
        '"rbac.authorization.k8s.io" at the cluster scope' in out.stderr
    )
    assert lab.try_get("clusterrolebinding", "me-root", "") is None
    assert migrate_dry_run(alice) != "allowed"

    # An expired certificate: the client names it and its expiry before dialling...
    now = datetime.now(UTC)
    expired = user_config(
        lab,
        "old-admin",
        "system:masters",
        not_before=now - timedelta(days=30),
        not_after=now - timedelta(days=1),
    )
    out = lab.cli("get", "nodes", "--config", str(expired), check=False)
    assert out.returncode == 1
    assert "old-admin.crt (CN=old-admin,O=system:masters) expired at" in out.stderr
    # ...and one sent anyway never gets past the server's TLS handshake.
    files = ClientConfig.load(expired).tls
    assert files is not None

    async def handshake() -> grpc.StatusCode:
        creds = grpc.ssl_channel_credentials(
            files.ca.read_bytes(), files.key.read_bytes(), files.cert.read_bytes()
        )
        server = f"127.0.0.1:{lab.info()['apiPort']}"
        async with grpc.aio.secure_channel(server, creds) as channel:
            stub = api_pb2_grpc.ApiStub(channel)
            try:
                await stub.WhoAmI(api_pb2.WhoAmIRequest(), timeout=10)
            except grpc.aio.AioRpcError as e:
                return e.code()
        return grpc.StatusCode.OK

    assert asyncio.run(handshake()) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.timeout(60)
def test_node_identity_is_confined_to_its_own_objects(cluster: LabHarness) -> None:
    lab = cluster
    vmi = lab.get("vmi", VM, NS)
    host = vmi["status"]["nodeName"]
    state = vmi["status"].get("migrationState") or {}
    involved = {host, state.get("sourceNode"), state.get("targetNode")}
    other = next(n for n in lab.lab.node_names() if n not in involved)
    stranger = node_config(lab, other)

    def patch_vmi(api: ApiClient) -> Any:
        return api.patch("VirtualMachineInstance", NS, VM, {"metadata": {"labels": {"x": "y"}}})

    with pytest.raises(Forbidden, match=f'User "system:node:{other}" cannot patch'):
        call(stranger, patch_vmi)
    with pytest.raises(Forbidden, match="its own Node"):
        call(
            stranger,
            lambda api: api.patch("Node", None, host, {"metadata": {"labels": {"x": "y"}}}),
        )
    with pytest.raises(Forbidden, match="nodes may not read secrets"):
        call(stranger, lambda api: api.list("Secret", NS))
    # The node hosting the VM may change it.
    call(node_config(lab, host), patch_vmi)


@pytest.mark.timeout(30)
def test_audit_log_records_every_decision(cluster: LabHarness) -> None:
    lab = cluster
    alice = user_config(lab, "alice")
    migrate_dry_run(alice)
    try:
        call(alice, lambda api: api.get("Node", None, "node1"))
    except ApiError:
        pass
    entries = audit_entries(lab)
    denied = [e for e in entries if e["user"] == "alice" and not e["allowed"]]
    assert any(
        e["verb"] == "create"
        and e["resource"] == "virtualmachineinstancemigrations"
        and e["namespace"] == NS
        and "cannot create" in e["reason"]
        for e in denied
    )
    assert any(
        e["verb"] == "get" and e["resource"] == "nodes" and e["name"] == "node1" for e in denied
    )
    allowed = [e for e in entries if e["allowed"] and e["user"] == "admin"]
    assert allowed and 'ClusterRoleBinding "cluster-admin"' in allowed[-1]["reason"]
    assert any(e["user"].startswith("system:node:") and e["allowed"] for e in entries)
    assert set(entries[-1]) >= {
        "time",
        "user",
        "groups",
        "verb",
        "resource",
        "namespace",
        "name",
        "allowed",
        "reason",
    }


@pytest.mark.timeout(180)
def test_stream_token_is_readable_only_by_the_migrations_two_nodes(cluster: LabHarness) -> None:
    """Issue 16: a user with only ``view`` on a namespace cannot read any migration's
    stream token (not in the VMI, not in the VMIM, not as a Secret); of the nodes, only
    the source and the target may get the token's Secret, which goes when it ends."""
    lab = cluster
    lab.cli("create", "rolebinding", "vic-view", "--clusterrole=view", "--user=vic", "-n", NS)
    vic = user_config(lab, "vic")
    alice = user_config(lab, "alice")  # ns1's admin
    lab.cli(
        "apply",
        "-n",
        NS,
        "-f",
        "-",
        input=vm_manifest("token-vm", memory="128Mi", dirty_rate="1Mi", hot_set="4Mi"),
    )
    lab.wait_for(
        "token-vm running",
        lambda: (
            ((lab.try_get("vmi", "token-vm", NS) or {}).get("status") or {}).get("phase")
            == "Running"
        ),
        timeout=60,
    )
    lab.set_live_migration_config(bandwidthPerMigration="8Mi")  # ~16 s: time to look
    try:
        out = lab.cli("migrate", "token-vm", "-n", NS).stdout
        name = migration_name(out)

        def running() -> dict[str, Any] | None:
            vmim = lab.get("vmim", name, NS)
            ms = (vmim.get("status") or {}).get("migrationState") or {}
            return vmim if ms.get("startTimestamp") and not ms.get("completed") else None

        vmim = lab.wait_for("the migration running", running, timeout=60, interval=0.2)
        secret_name = token_secret_name(vmim["metadata"]["uid"])
        secret = lab.get("secret", secret_name, TOKEN_SECRET_NAMESPACE)  # a cluster admin may
        token = base64.b64decode(secret["data"][TOKEN_SECRET_KEY]).decode()
        assert len(token) >= 32

        # The viewer: the VMI and the VMIM carry no token; no Secret is readable.
        vmi_json = lab.cli("get", "vmi", "token-vm", "-n", NS, "-o", "json", "--config", str(vic))
        state = json.loads(vmi_json.stdout)["status"]["migrationState"]
        assert state["migrationUid"] == vmim["metadata"]["uid"] and "token" not in state
        vmims_json = lab.cli("get", "vmim", "-n", NS, "-o", "json", "--config", str(vic)).stdout
        for text in (vmi_json.stdout, vmims_json):
            assert token not in text
        for who, args in (
            (vic, ("get", "secret", "-n", TOKEN_SECRET_NAMESPACE)),
            (vic, ("get", "secret", secret_name, "-n", TOKEN_SECRET_NAMESPACE)),
            (vic, ("get", "secret", "-n", NS)),
            (alice, ("get", "secret", secret_name, "-n", TOKEN_SECRET_NAMESPACE)),
        ):
            denied = lab.cli(*args, "-o", "json", "--config", str(who), check=False)
            assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), denied
            assert token not in denied.stdout + denied.stderr

        # The nodes: the source and the target read it, a third node does not.
        state = lab.get("vmi", "token-vm", NS)["status"]["migrationState"]
        involved = [state["sourceNode"], state["targetNode"]]
        [bystander] = [n for n in lab.lab.node_names() if n not in involved]

        def read(node: str) -> Any:
            return call(
                node_config(lab, node),
                lambda api: api.get("Secret", TOKEN_SECRET_NAMESPACE, secret_name),
            )

        for node in involved:
            assert read(node)["data"][TOKEN_SECRET_KEY] == secret["data"][TOKEN_SECRET_KEY]
        with pytest.raises(Forbidden, match="neither the source nor the target"):
            read(bystander)
        with pytest.raises(Forbidden, match="nodes may not read secrets"):
            call(node_config(lab, involved[0]), lambda api: api.list("Secret", None))

        final = lab.wait_for(
            "the migration to finish",
            lambda: (
                (m := lab.get("vmim", name, NS))["status"]["phase"] in ("Succeeded", "Failed") and m
            ),
            timeout=120,
            interval=0.3,
        )
        assert final["status"]["phase"] == "Succeeded"
        assert lab.try_get("secret", secret_name, TOKEN_SECRET_NAMESPACE) is None
    finally:
        lab.set_live_migration_config(bandwidthPerMigration="0")
        lab.cli("delete", "vm", "token-vm", "-n", NS, check=False)


@pytest.mark.timeout(240)
def test_a_node_cannot_touch_a_vmi_it_migrated_away(cluster: LabHarness) -> None:
    """Issue 26, item 1, as probed: after the VM moved node A -> node B and the migration
    completed, node A's certificate can no longer patch the VMI's labels, its
    ``spec.domain.memory`` nor ``status.phase``; node B, where it runs, still may."""
    lab = cluster
    lab.cli("apply", "-n", NS, "-f", "-", input=vm_manifest("moved-vm", memory="64Mi"))
    try:
        vmi = lab.wait_for(
            "moved-vm running",
            lambda: (
                v
                if ((v := lab.try_get("vmi", "moved-vm", NS) or {}).get("status") or {}).get(
                    "phase"
                )
                == "Running"
                else None
            ),
            timeout=60,
        )
        source = vmi["status"]["nodeName"]
        out = lab.cli("migrate", "moved-vm", "-n", NS, "--wait", timeout=150)
        assert "succeeded" in out.stdout, out.stdout + out.stderr
        moved = lab.get("vmi", "moved-vm", NS)
        target = moved["status"]["nodeName"]
        assert target != source and moved["status"]["migrationState"]["completed"]
        old = node_config(lab, source)
        for patch, extra in (
            ('{"metadata":{"labels":{"owned-by":"old-node"}}}', ()),
            ('{"spec":{"domain":{"memory":{"guest":"128Mi"}}}}', ()),
            ('{"status":{"phase":"Failed"}}', ("--subresource", "status")),
        ):
            denied = lab.cli(
                "patch",
                "vmi",
                "moved-vm",
                "-n",
                NS,
                "--type",
                "merge",
                "-p",
                patch,
                *extra,
                "--config",
                str(old),
                check=False,
            )
            assert denied.returncode == 1, denied
            assert f'User "system:node:{source}" cannot patch' in denied.stderr, denied.stderr
        after = lab.get("vmi", "moved-vm", NS)
        assert after["metadata"]["uid"] == vmi["metadata"]["uid"]
        assert after["status"]["phase"] == "Running"
        assert "owned-by" not in (after["metadata"].get("labels") or {})
        assert after["spec"]["domain"]["memory"] == moved["spec"]["domain"]["memory"]
        lab.cli(
            "patch",
            "vmi",
            "moved-vm",
            "-n",
            NS,
            "--type",
            "merge",
            "-p",
            '{"metadata":{"labels":{"checked-by":"its-node"}}}',
            "--config",
            str(node_config(lab, target)),
        )
    finally:
        lab.cli("delete", "vm", "moved-vm", "-n", NS, check=False)


@pytest.mark.timeout(60)
def test_audit_log_records_final_decisions_and_authentication_failures(
    cluster: LabHarness,
) -> None:
    """Issue 26, item 5: a refused escalation is logged denied at the escalation stage (not
    allowed by RBAC), and rejected or revoked bearer tokens are logged with the reason
    and the caller's address."""
    lab = cluster
    alice = user_config(lab, "alice")  # ns1's admin
    out = lab.cli(
        "create",
        "-n",
        NS,
        "rolebinding",
        "esc3",
        "--clusterrole=cluster-admin",
        "--user=alice",
        "--config",
        str(alice),
        check=False,
    )
    assert out.returncode == 1 and "not currently held" in out.stderr
    lab.apply(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": "audit-bot", "namespace": NS},
            }
        )
    )
    lab.apply(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "kubernetes.io/service-account-token",
                "metadata": {
                    "name": "audit-bot-token",
                    "namespace": NS,
                    "annotations": {"kubernetes.io/service-account.name": "audit-bot"},
                },
            }
        )
    )
    encoded = lab.wait_for(
        "the bot's token",
        lambda: (lab.try_get("secret", "audit-bot-token", NS) or {}).get("data", {}).get("token"),
        timeout=15,
    )
    revoked = token_config(lab, base64.b64decode(encoded).decode(), "audit-bot")
    lab.cli("delete", "secret", "audit-bot-token", "-n", NS)
    with pytest.raises(Unauthorized, match="deleted"):
        call(revoked, lambda api: api.whoami())
    with pytest.raises(Unauthorized):
        call(token_config(lab, "not-a-token", "junk"), lambda api: api.whoami())

    entries = audit_entries(lab)
    esc3 = [e for e in entries if e["name"] == "esc3" and e["user"] == "alice"]
    assert len(esc3) == 1, esc3
    assert esc3[0]["allowed"] is False and esc3[0]["stage"] == "escalation", esc3
    assert "not currently held" in esc3[0]["reason"]
    failures = [e for e in entries if e["stage"] == "authentication"]
    assert any(
        'secret "ns1/audit-bot-token" holding it was deleted' in e["reason"] for e in failures
    )
    assert any("not a service-account token" in e["reason"] for e in failures)
    assert all(not e["allowed"] and e["peer"].startswith("ipv4:127.0.0.1:") for e in failures)
    assert all(
        e["stage"] in ("authentication", "validation", "rbac", "escalation", "admission")
        for e in entries
    )
