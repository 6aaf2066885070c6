"""The dedicated migration network (issue 17, reference 12.5.2), on a lab whose nodes have
their own network stacks: eth0 on the main network (192.0.2.0/24, shaped to 100 Mbit/s)
and eth1 on the migration network (a 1 Gbit/s link; addresses from 198.51.100.0/24 handed
out by the controller).

- the reference's procedure as written: ``create -f`` the NAD, ``edit hyperconverged`` to
  add ``network``, drain a node, read ``targetNodeAddress``;
- the wire bytes: >= 95 % of a busy VM's migration on eth1, the main network carrying only
  control traffic;
- a saturated main network leaves the migration's throughput as it was;
- ``bandwidthPerMigration`` holds on the real link, for one migration and for two at once;
- a NAD that does not exist, or a node without the NIC, is reported on the HyperConverged
  and fails a migration with that reason (never a silent fallback to the main network);
- bad NADs are refused with the field path.

Needs root and network namespaces; skipped (saying why) without them.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.lab import LabHarness, migration_name, vm_manifest
from vmferry.lab.netns import unsupported_reason

pytestmark = pytest.mark.skipif(
    unsupported_reason() is not None, reason=f"needs network namespaces: {unsupported_reason()}"
)

MIGRATION_RANGE = ipaddress.ip_network("198.51.100.0/24")
NAD = "migration-network"
HCO = ("hyperconverged", "kubevirt-hyperconverged", "-n", "openshift-cnv")


def nad_yaml(name: str = NAD, master: str = "eth1", range_: str = str(MIGRATION_RANGE)) -> str:
    """The reference's example NAD (macvlan on the migration NIC, whereabouts IPAM)."""
    config = {
        "cniVersion": "0.3.1",
        "name": "migration-bridge",
        "type": "macvlan",
        "master": master,
        "mode": "bridge",
        "ipam": {"type": "whereabouts", "range": range_},
    }
    return (
        'apiVersion: "k8s.cni.cncf.io/v1"\n'
        "kind: NetworkAttachmentDefinition\n"
        f"metadata:\n  name: {name}\n  namespace: openshift-cnv\n"
        f"spec:\n  config: '{json.dumps(config)}'\n"
    )


def editor(code: str) -> dict[str, str]:
    """$EDITOR for ``vmferry edit``: runs ``code`` on the YAML document ``d``."""
    return {
        "EDITOR": f'{sys.executable} -c "import sys,yaml;p=sys.argv[1];d=yaml.safe_load(open(p));'
        f"{code};yaml.safe_dump(d,open(p,'w'))\""
    }


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHarness]:
    harness = LabHarness(Path(tmp_path_factory.mktemp("netlab")))
    harness.up(nodes=3, netns=True, migration_link="1gbit,1ms", main_link="100mbit,1ms")
    try:
        yield harness
    finally:
        harness.down()


@pytest.fixture(scope="module")
def on_network(lab: LabHarness, tmp_path_factory: pytest.TempPathFactory) -> LabHarness:
    """The reference's first two steps: the NAD, then ``network`` in the HyperConverged
    (through ``vmferry edit``, as ``oc edit`` in the procedure)."""
    path = tmp_path_factory.mktemp("nad") / "nad.yaml"
    path.write_text(nad_yaml())
    out = lab.cli("create", "-f", str(path))
    assert "created" in out.stdout, out.stdout
    lab.cli("edit", *HCO, extra_env=editor(f"d['spec']['liveMigrationConfig']['network']='{NAD}'"))
    wait_network_ready(lab)
    return lab


def hco_condition(lab: LabHarness) -> dict[str, Any] | None:
    hco = lab.get("hco", "kubevirt-hyperconverged", "openshift-cnv")
    for c in (hco.get("status") or {}).get("conditions") or []:
        if c["type"] == "MigrationNetworkReady":
            return dict(c)
    return None


def wait_network_ready(lab: LabHarness) -> None:
    def ready() -> bool:
        c = hco_condition(lab)
        return c is not None and c["status"] == "True"

    lab.wait_for("the HyperConverged to report the migration network ready", ready, 60)
    for node in lab.lab.node_names():
        addresses = lab.get("node", node)["status"]["addresses"]
        ip = next(a["address"] for a in addresses if a["type"] == "MigrationIP")
        assert ipaddress.ip_address(ip) in MIGRATION_RANGE, (node, addresses)


def place_on(lab: LabHarness, node: str, manifest: str) -> str:
    """Start the VM of ``manifest`` on ``node`` (the others cordoned while it starts)."""
    others = [n for n in lab.lab.node_names() if n != node]
    for n in others:
        lab.cli("adm", "cordon", n)
    try:
        lab.apply(manifest)
        name = str(json.loads(manifest)["metadata"]["name"])
        assert lab.wait_vmi_running(name)["status"]["nodeName"] == node
    finally:
        for n in others:
            lab.cli("adm", "uncordon", n)
    return name


def migrate(lab: LabHarness, vm: str, *extra: str) -> str:
    out = lab.cli("migrate", vm, *extra)
    return migration_name(out.stdout)


def share_on(transfer: dict[str, Any], interface: str) -> float:
    """The share of the source's NIC bytes (during the migration) that ``interface`` carried."""
    counted = transfer["networkBytes"]
    return counted.get(interface, 0) / max(1, sum(counted.values()))


@pytest.mark.timeout(240)
def test_reference_procedure_drain_moves_the_vm_over_the_migration_network(
    on_network: LabHarness,
) -> None:
    lab = on_network
    vm = place_on(lab, "node1", vm_manifest("drained", "256Mi", "16Mi", "64Mi", "random"))
    try:
        lab.cli("adm", "drain", "node1", "--timeout", "120", timeout=150)
        vmi = lab.wait_for(
            "the VMI to run elsewhere",
            lambda: (
                (v := lab.get("vmi", vm))["status"].get("nodeName") != "node1"
                and v["status"].get("phase") == "Running"
                and v
            ),
            60,
        )
        address = lab.cli(
            "get",
            "vmi",
            vm,
            "-o",
            "jsonpath={.status.migrationState.targetNodeAddress}",
        ).stdout.strip()
        assert ipaddress.ip_address(address) in MIGRATION_RANGE, address
        transfer = vmi["status"]["migrationState"]["transfer"]
        print(
            f"drain: {transfer['wireBytes'] >> 20} MiB on the wire, NIC bytes "
            f"{transfer['networkBytes']} in {transfer['networkSeconds']:.1f}s"
        )
        assert transfer["networkInterface"] == "eth1"
        assert share_on(transfer, "eth1") >= 0.95, transfer["networkBytes"]
        # The main network carried control traffic only: far less than the memory moved.
        assert transfer["networkBytes"].get("eth0", 0) < transfer["wireBytes"] / 20
    finally:
        lab.cli("adm", "uncordon", "node1")
        lab.cli("delete", "vm", vm, check=False)


class MainNetworkLoad:
    """A bounded bulk TCP load between two nodes' main addresses (node2 → node3), through
    the lab's 100 Mbit/s main links: a sender and a discarding receiver, each a process
    inside its node's namespace."""

    RECEIVER = (
        "import socket,sys\n"
        "s=socket.create_server((sys.argv[1],int(sys.argv[2])))\n"
        "c,_=s.accept()\n"
        "while c.recv(1<<16): pass\n"
    )
    SENDER = (
        "import socket,sys,time\n"
        "c=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=10)\n"
        "end=time.monotonic()+float(sys.argv[3]); b=bytes(1<<16)\n"
        "try:\n"
        " while time.monotonic()<end: c.sendall(b)\n"
        "except OSError: pass\n"
    )

    def __init__(self, lab: LabHarness, seconds: float) -> None:
        self.lab = lab
        self.seconds = seconds
        self.procs: list[subprocess.Popen[bytes]] = []

    def main_ip(self, node: str) -> str:
        addresses = self.lab.get("node", node)["status"]["addresses"]
        return str(next(a["address"] for a in addresses if a["type"] == "InternalIP"))

    def __enter__(self) -> MainNetworkLoad:
        ip, port = self.main_ip("node3"), 20999
        self.procs.append(
            subprocess.Popen(
                self.lab.lab.netns_exec(
                    "node3", [sys.executable, "-c", self.RECEIVER, ip, str(port)]
                )
            )
        )
        time.sleep(0.5)
        self.procs.append(
            subprocess.Popen(
                self.lab.lab.netns_exec(
                    "node2",
                    [sys.executable, "-c", self.SENDER, ip, str(port), str(self.seconds)],
                )
            )
        )
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=10)


def capped_migration(lab: LabHarness, vm: str, target: str) -> dict[str, Any]:
    """Migrate ``vm`` to ``target``; its ``transfer`` record."""
    name = migrate(lab, vm, "--addedNodeSelector", f"kubernetes.io/hostname={target}")
    vmim = lab.wait_vmim_final(name, timeout=90)
    assert vmim["status"]["phase"] == "Succeeded", vmim["status"]
    transfer: dict[str, Any] = vmim["status"]["migrationState"]["transfer"]
    assert transfer["networkInterface"] == "eth1"
    return transfer


@pytest.mark.timeout(300)
def test_a_saturated_main_network_leaves_the_migration_as_fast(on_network: LabHarness) -> None:
    lab = on_network
    # 24 MiB/s: twice what the whole 100 Mbit/s main link could carry, well under the
    # migration link's 1 Gbit/s -- and little enough CPU for this machine's two cores.
    lab.set_live_migration_config(bandwidthPerMigration="24Mi")
    vm = place_on(lab, "node2", vm_manifest("steady", "128Mi", "0", content="random"))
    try:
        quiet = capped_migration(lab, vm, "node3")
        with MainNetworkLoad(lab, seconds=60):
            time.sleep(1)
            loaded = capped_migration(lab, vm, "node2")
        # The load really filled node3's main link (12.5 MB/s) while it sent the VM.
        main_rate = loaded["networkBytes"]["eth0"] / loaded["networkSeconds"]
        rates = [t["averageWireRateBytes"] / 2**20 for t in (quiet, loaded)]
        print(
            f"migration rate: quiet {rates[0]:.1f} MiB/s, main saturated {rates[1]:.1f} MiB/s "
            f"(main link meanwhile {main_rate / 1e6:.1f} MB/s)"
        )
        assert main_rate > 8e6, loaded["networkBytes"]
        assert rates[1] >= 0.9 * rates[0], rates
    finally:
        lab.set_live_migration_config(bandwidthPerMigration="0")
        lab.cli("delete", "vm", vm, check=False)


@pytest.mark.timeout(300)
def test_bandwidth_per_migration_holds_on_the_link(on_network: LabHarness) -> None:
    lab = on_network
    cap = 32 << 20
    lab.set_live_migration_config(bandwidthPerMigration="32Mi")
    vms = [
        place_on(lab, "node1", vm_manifest(name, "160Mi", "0", content="random"))
        for name in ("cap-solo", "cap-a", "cap-b")
    ]
    try:
        # One migration: the NIC's own counters over the migration's window.
        name = migrate(lab, vms[0], "--addedNodeSelector", "kubernetes.io/hostname=node2")
        vmim = lab.wait_vmim_final(name, timeout=90)
        assert vmim["status"]["phase"] == "Succeeded", vmim["status"]
        transfer = vmim["status"]["migrationState"]["transfer"]
        wire = transfer["networkBytes"]["eth1"] / transfer["networkSeconds"]
        print(f"one migration at 32Mi: eth1 carried {wire / 2**20:.2f} MiB/s")
        assert 0.9 * cap <= wire <= 1.1 * cap, transfer
        # Two at once from one node: each holds its cap.
        names = [
            migrate(lab, vm, "--addedNodeSelector", "kubernetes.io/hostname=node3")
            for vm in vms[1:]
        ]
        rates = []
        for n in names:
            vmim = lab.wait_vmim_final(n, timeout=120)
            assert vmim["status"]["phase"] == "Succeeded", vmim["status"]
            rates.append(vmim["status"]["migrationState"]["transfer"]["averageWireRateBytes"])
        print("two at once at 32Mi: " + ", ".join(f"{r / 2**20:.2f} MiB/s" for r in rates))
        for rate in rates:
            assert 0.9 * cap <= rate <= 1.1 * cap, rates
    finally:
        lab.set_live_migration_config(bandwidthPerMigration="0")
        for vm in vms:
            lab.cli("delete", "vm", vm, check=False)


@pytest.mark.timeout(240)
def test_a_network_that_cannot_be_honoured_fails_the_migration(
    on_network: LabHarness, tmp_path: Path
) -> None:
    lab = on_network
    vm = place_on(lab, "node1", vm_manifest("unhonoured", "64Mi", "0", content="random"))
    try:
        # A NAD that does not exist.
        lab.set_live_migration_config(network="no-such-network")
        lab.wait_for(
            "the HyperConverged to name the missing NAD",
            lambda: (
                (c := hco_condition(lab)) is not None
                and c["status"] == "False"
                and "openshift-cnv/no-such-network" in c["message"]
            ),
            30,
        )
        vmim = lab.wait_vmim_final(migrate(lab, vm), timeout=60)
        reason = vmim["status"]["migrationState"].get("failureReason") or ""
        assert vmim["status"]["phase"] == "Failed" and "no-such-network" in reason, reason
        assert lab.get("vmi", vm)["status"]["nodeName"] == "node1"
        # A NAD whose NIC the nodes lack.
        path = tmp_path / "nad.yaml"
        path.write_text(nad_yaml("no-nic", master="eth7", range_="203.0.113.0/24"))
        lab.cli("create", "-f", str(path))
        lab.set_live_migration_config(network="no-nic")
        lab.wait_for(
            "the HyperConverged to name the nodes without eth7",
            lambda: (
                (c := hco_condition(lab)) is not None
                and c["status"] == "False"
                and all(n in c["message"] for n in lab.lab.node_names())
                and "eth7" in c["message"]
            ),
            30,
        )
        vmim = lab.wait_vmim_final(migrate(lab, vm), timeout=60)
        reason = vmim["status"]["migrationState"].get("failureReason") or ""
        assert vmim["status"]["phase"] == "Failed" and "eth7" in reason, reason
        assert lab.get("vmi", vm)["status"]["nodeName"] == "node1"
    finally:
        lab.set_live_migration_config(network=NAD)
        lab.cli("delete", "net-attach-def", "no-nic", "-n", "openshift-cnv", check=False)
        lab.cli("delete", "vm", vm, check=False)
    wait_network_ready(lab)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("{not json", "spec.config: invalid JSON"),
        (
            '{"cniVersion":"0.3.1","name":"m","type":"macvlan",'
            '"ipam":{"type":"whereabouts","range":"198.51.100.0/24"}}',
            "spec.config: master: required",
        ),
        (
            '{"cniVersion":"0.3.1","name":"m","type":"macvlan","master":"eth1",'
            '"ipam":{"type":"whereabouts","range":"192.0.2.0/24"}}',
            "spec.config: ipam.range: 192.0.2.0/24 overlaps the main network",
        ),
    ],
    ids=["bad-json", "no-master", "overlaps-main"],
)
def test_bad_nads_are_refused_with_the_field(lab: LabHarness, config: str, expected: str) -> None:
    manifest = {
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": "bad", "namespace": "openshift-cnv"},
        "spec": {"config": config},
    }
    out = lab.cli("create", "-f", "-", input=json.dumps(manifest), check=False)
    assert out.returncode != 0
    assert expected in out.stderr, out.stderr
    assert lab.try_get("net-attach-def", "bad", "openshift-cnv") is None
