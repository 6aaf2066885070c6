"""Install on hosts, under a real systemd: three host containers (systemd-nspawn) get
vmferry by README's "Install on hosts" procedure (``make dist``, ``deploy/install.sh
ROLE``, the controller's certificate, ``systemctl start``; the handler hosts get theirs
with ``vmferry join`` and a bootstrap token); then a VM migrates between the two handler
hosts, the source handler is restarted (``systemctl restart``) during a migration and
the controller is killed (``systemctl kill -s KILL``), and the units' security figures
are read from ``systemd-analyze security`` on the booted hosts.

Root only (it boots containers); skips elsewhere and says why.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from tests.support import nspawn
from tests.support.lab import LabHarness, migration_name, vm_manifest
from vmferry.lab.ports import free_port

REPO = Path(__file__).resolve().parents[2]
NODES = ("node-a", "node-b")
MAX_EXPOSURE = {"controller": 2.0, "handler": 2.5}  # README "Install on hosts"
CERT_SECONDS = 120  # the nodes join with 2-minute certificates: renewed at 80 s

pytestmark = pytest.mark.skipif(bool(nspawn.unavailable()), reason=str(nspawn.unavailable()))


class Cluster:
    """The three booted hosts, the client of the cluster and where things listen."""

    def __init__(self, base: Path) -> None:
        self.base = base
        binds = [f"--bind-ro={REPO}:/src"]
        self.cp = nspawn.Host("vmf-cp", base, binds)
        self.nodes = {n: nspawn.Host(f"vmf-{n}", base, binds) for n in NODES}
        self.api_port = free_port("127.0.0.1")
        self.token_port = free_port("127.0.0.1")
        self.pki = base / "pki"
        self.client = LabHarness(base / "client")
        self.joined: dict[str, datetime] = {}  # node -> not-after of the certificate it joined with

    @property
    def hosts(self) -> list[nspawn.Host]:
        return [self.cp, *self.nodes.values()]

    def vmferry(self, *args: str) -> None:
        subprocess.run(
            [str(REPO / ".venv/bin/vmferry"), *args, "--pki-dir", str(self.pki)],
            check=True,
            capture_output=True,
        )

    def install_pki(self, host: nspawn.Host, files: dict[str, str]) -> None:
        """Copy ``pki-relative path -> /etc/vmferry/pki path`` into the host, readable by
        group vmferry only (the CA host keeps ca.key)."""
        for src, dst in files.items():
            target = host.root / dst.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((self.pki / src).read_bytes())
        host.run("chgrp", "-R", "vmferry", "/etc/vmferry/pki")
        host.run("chmod", "-R", "u=rwX,g=rX,o=", "/etc/vmferry/pki")

    def write_config(self, host: nspawn.Host, role: str, text: str) -> None:
        (host.root / "etc/vmferry" / f"{role}.toml").write_text(text)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("hosts")))
    subprocess.run(["make", "-s", "dist"], cwd=REPO, check=True, capture_output=True)
    try:
        for host in c.hosts:
            host.boot()
        for host in c.hosts:
            host.wait_booted()
        setup(c)
        yield c
    finally:
        for host in c.hosts:
            host.poweroff()


def setup(c: Cluster) -> None:
    """README "Install on hosts", step by step."""
    # 1. each host: deploy/install.sh ROLE (the three at once: pip downloads the wheels)
    roles = [(c.cp, "controller"), *((h, "handler") for h in c.nodes.values())]
    with concurrent.futures.ThreadPoolExecutor(len(roles)) as pool:
        done = [
            pool.submit(h.run, "/src/deploy/install.sh", role, "--no-start", timeout=300)
            for h, role in roles
        ]
        for f in done:
            f.result()
    # 2. the CA (on the administrator's machine) and the certificates
    c.vmferry("pki", "init", "--cluster-name", "nspawn")
    c.vmferry("pki", "issue", "server", "vmferry-controller", "--ip", "127.0.0.1")
    c.vmferry("pki", "issue", "user", "admin", "--group", "system:masters")
    c.install_pki(
        c.cp,
        {
            "ca.crt": "/etc/vmferry/pki/ca.crt",
            "ca.key": "/etc/vmferry/pki/ca.key",  # the controller signs the nodes' requests
            "servers/vmferry-controller.crt": "/etc/vmferry/pki/servers/vmferry-controller.crt",
            "servers/vmferry-controller.key": "/etc/vmferry/pki/servers/vmferry-controller.key",
        },
    )
    # 3. the configuration, then start
    c.write_config(
        c.cp,
        "controller",
        f'listen = "127.0.0.1:{c.api_port}"\n'
        f'token_listen = "127.0.0.1:{c.token_port}"\n'
        'ca_key = "/etc/vmferry/pki/ca.key"\n'
        'data_dir = "/var/lib/vmferry/controller"\n'
        'ca = "/etc/vmferry/pki/ca.crt"\n'
        'cert = "/etc/vmferry/pki/servers/vmferry-controller.crt"\n'
        'key = "/etc/vmferry/pki/servers/vmferry-controller.key"\n'
        "node_grace_seconds = 10\n"
        'log_level = "info"\n',
    )
    c.cp.run("systemctl", "start", "vmferry-controller")  # returns at READY=1
    write_client(c)
    for n, host in c.nodes.items():
        # 4. each handler host: its key made there, its certificate by CSR
        out = c.client.cli("token", "create", "--ttl", "10m").stdout.splitlines()
        token, pin = out[0], out[1].split()[2]
        host.run(
            *("/opt/vmferry/venv/bin/vmferry", "join", "--server", f"127.0.0.1:{c.token_port}"),
            *("--token", token, "--ca-hash", pin, "--node-name", n, "--ip", "127.0.0.1"),
            *("--pki-dir", "/etc/vmferry/pki", "--expiration", f"{CERT_SECONDS}s"),
        )
        cert = x509.load_pem_x509_certificate(
            (host.root / f"etc/vmferry/pki/nodes/{n}.crt").read_bytes()
        )
        c.joined[n] = cert.not_valid_after_utc
        host.run("chgrp", "-R", "vmferry", "/etc/vmferry/pki")
        host.run("chmod", "-R", "u=rwX,g=rX,o=", "/etc/vmferry/pki")
        c.write_config(
            host,
            "handler",
            f'node_name = "{n}"\n'
            f'api_server = "127.0.0.1:{c.api_port}"\n'
            'ca = "/etc/vmferry/pki/ca.crt"\n'
            f'cert = "/etc/vmferry/pki/nodes/{n}.crt"\n'
            f'key = "/etc/vmferry/pki/nodes/{n}.key"\n'
            'main_address = "127.0.0.1"\n'
            'migration_address = "127.0.0.1"\n'
            f"migration_port = {free_port('127.0.0.1')}\n"
            "configure_migration_network = false\n"  # the hosts share one network here
            'memory = "2Gi"\n',
        )
        host.run("systemctl", "start", "vmferry-handler")


def write_client(c: Cluster) -> None:
    """The administrator's client configuration (user admin, system:masters)."""
    client = {
        "apiVersion": "vmferry.io/v1",
        "kind": "Config",
        "server": f"127.0.0.1:{c.api_port}",
        "certificateAuthority": str(c.pki / "ca.crt"),
        "clientCertificate": str(c.pki / "users/admin.crt"),
        "clientKey": str(c.pki / "users/admin.key"),
    }
    (c.base / "client").mkdir(exist_ok=True)
    (c.base / "client" / "client.yaml").write_text(yaml.safe_dump(client))


def guest_scopes(host: nspawn.Host) -> list[str]:
    out = host.run(
        "systemctl", "list-units", "--plain", "--no-legend", "--state=active", "vmferry-*.scope"
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def show(host: nspawn.Host, unit: str, prop: str) -> str:
    return host.run("systemctl", "show", "-P", prop, unit).stdout.strip()


@pytest.mark.timeout(300)
def test_units_are_notify_and_hardened_on_a_real_systemd(cluster: Cluster) -> None:
    c = cluster
    assert show(c.cp, "vmferry-controller", "User") == "vmferry"
    assert show(c.cp, "vmferry-controller", "StatusText").startswith("serving the API on")
    assert "guest(s)" in show(c.nodes["node-a"], "vmferry-handler", "StatusText")
    figures = {}
    for role, host in (("controller", c.cp), ("handler", c.nodes["node-a"])):
        out = host.run("systemd-analyze", "security", "--no-pager", f"vmferry-{role}").stdout
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
        assert match, out[-500:]
        figures[role] = float(match.group(1))
    print(f"systemd-analyze security on the hosts: {figures}")
    assert all(figures[r] <= MAX_EXPOSURE[r] for r in figures), figures
    # ExecReload: SIGHUP re-reads the file; the log level applies live
    (c.cp.root / "etc/vmferry/controller.toml").write_text(
        (c.cp.root / "etc/vmferry/controller.toml").read_text().replace('"info"', '"debug"')
    )
    c.cp.run("systemctl", "reload", "vmferry-controller")
    c.client.wait_for(
        "the reload in the journal",
        lambda: "reload: applied log_level=debug" in c.cp.journal("vmferry-controller"),
        timeout=20,
    )


@pytest.mark.timeout(300)
def test_migrate_restart_the_source_handler_and_kill_the_controller(cluster: Cluster) -> None:
    c, lab = cluster, cluster.client
    lab.apply(vm_manifest("roamer", memory="128Mi", dirty_rate="4Mi", content="random"))
    vmi = lab.wait_vmi_running("roamer", timeout=90)
    first = vmi["status"]["nodeName"]
    other = next(n for n in NODES if n != first)
    [scope] = guest_scopes(c.nodes[first])
    assert show(c.nodes[first], scope, "Slice") == "machine.slice"

    out = lab.cli("migrate", "roamer", "--wait", timeout=150)
    assert "succeeded" in out.stdout, out.stdout
    assert lab.get("vmi", "roamer")["status"]["nodeName"] == other
    [scope] = guest_scopes(c.nodes[other])

    # a slow migration back; its source handler is restarted while it runs
    lab.set_live_migration_config(bandwidthPerMigration="16Mi")
    out = lab.cli("migrate", "roamer")
    name = migration_name(out.stdout)

    def sending() -> bool:
        ms = lab.get("vmim", name)["status"].get("migrationState") or {}
        return (ms.get("transfer") or {}).get("dataProcessedBytes", 0) > (16 << 20)

    lab.wait_for("the migration to send data", sending, timeout=60)
    c.nodes[other].run("systemctl", "restart", "vmferry-handler")
    vmim = lab.wait_vmim_final(name, timeout=120)
    lab.set_live_migration_config(bandwidthPerMigration="0")
    phase = vmim["status"]["phase"]
    where = first if phase == "Succeeded" else other
    assert lab.wait_vmi_running("roamer")["status"]["nodeName"] == where
    if phase == "Failed":  # the guest survived the restart, in its own scope
        assert show(c.nodes[other], scope, "ActiveState") == "active"
        reason = vmim["status"]["migrationState"]["failureReason"]
        errors = c.nodes[other].journal("vmferry-handler", "-p", "err")
        assert f"failed: {reason}" in errors, errors
    print(f"migration with the source handler restarted: {phase}")

    # the controller killed: systemd restarts it, nothing is lost
    restarts = int(show(c.cp, "vmferry-controller", "NRestarts"))
    c.cp.run("systemctl", "kill", "-s", "KILL", "vmferry-controller")
    lab.wait_for(
        "systemd to restart the controller",
        lambda: (
            int(show(c.cp, "vmferry-controller", "NRestarts")) > restarts
            and show(c.cp, "vmferry-controller", "ActiveState") == "active"
        ),
        timeout=60,
    )
    assert lab.get("vm", "roamer")["metadata"]["name"] == "roamer"
    assert lab.wait_vmi_running("roamer")["status"]["nodeName"] == where
    out = lab.cli("migrate", "roamer", "--wait", timeout=150)
    assert "succeeded" in out.stdout, out.stdout
    nodes = json.loads(lab.cli("get", "nodes", "-o", "json").stdout)
    assert sorted(n["metadata"]["name"] for n in nodes["items"]) == list(NODES)


@pytest.mark.timeout(300)
def test_two_minute_node_certificates_are_rotated(cluster: Cluster) -> None:
    """Each handler renews its 2-minute certificate by CSR at 80 s, without a restart;
    past the first certificate's expiry the nodes heartbeat and migrate."""
    c, lab = cluster, cluster.client
    for n, host in c.nodes.items():
        try:
            lab.wait_for(
                f"{n} to renew its certificate",
                lambda host=host: "certificate renewed" in host.journal("vmferry-handler"),
                timeout=150,
                interval=2,
            )
        except AssertionError as e:
            tail = host.journal("vmferry-handler", "-p", "warning", "-n", "20")
            raise AssertionError(f"{e}\n{tail}") from None
        assert show(host, "vmferry-handler", "NRestarts") == "0"
    expiry = max(c.joined.values())
    lab.wait_for(
        "the first certificates to expire",
        lambda: datetime.now(UTC) > expiry,
        timeout=CERT_SECONDS + 30,
        interval=1,
    )

    def beats_after_expiry() -> bool:
        for n in NODES:
            conds = lab.get("node", n)["status"]["conditions"]
            ready = next(x for x in conds if x["type"] == "Ready")
            beat = datetime.fromisoformat(ready["lastHeartbeatTime"].replace("Z", "+00:00"))
            if ready["status"] != "True" or beat <= expiry:
                return False
        return True

    lab.wait_for("heartbeats after the first certificates expired", beats_after_expiry, 30)
    out = lab.cli("migrate", "roamer", "--wait", timeout=150)
    assert "succeeded" in out.stdout, out.stdout
